"""Ask running seeds what they serve: ``python -m vllm_ascend.model_loader.netloader.query``.

Prints one JSON object per address (model identity, rank, size, value fingerprint,
where its weights came from, active and completed transfers). Uses the shared
secret from ``--secret-file`` or ``$NETLOADER_SECRET`` when the seed requires one.
Exits 1 if any seed could not be asked.
"""

import argparse
import json
import os
import sys

from vllm_ascend.model_loader.netloader.client import SOURCE_ERRORS, query_seed
from vllm_ascend.model_loader.netloader.config import NetloaderConfigError, parse_config
from vllm_ascend.model_loader.netloader.wire.addresses import AddressError, parse_address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netloader-query", description="Ask Netloader seeds what they serve."
    )
    parser.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--secret-file", help="file holding the shared secret")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per seed")
    args = parser.parse_args(argv)
    try:
        for address in args.addresses:
            parse_address(address, key=address)
        extra = {"SECRET_FILE": args.secret_file} if args.secret_file else {}
        secret = parse_config(extra, os.environ).secret
    except (NetloaderConfigError, AddressError) as e:
        parser.error(str(e))
    failed = 0
    for address in args.addresses:
        try:
            info = query_seed(address, args.timeout, secret)
            print(json.dumps({"address": address, **info}, sort_keys=True))
        except SOURCE_ERRORS as e:
            failed += 1
            print(json.dumps({"address": address, "error": f"{type(e).__name__}: {e}"}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
