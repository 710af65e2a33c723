"""Run inside a network namespace, where the test process cannot reach: wait for a
vLLM server, take its greedy outputs, or ask seeds for ``info``; prints one JSON line.

    python -m tests.helpers.netns_probe wait URL TIMEOUT_S
    python -m tests.helpers.netns_probe greedy URL MODEL
    python -m tests.helpers.netns_probe info ADDRESS [ADDRESS ...]
"""

import json
import sys
import time
import urllib.error
import urllib.request

from tests.helpers.e2e import PROMPTS


def wait(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    return False


def greedy(url: str, model: str) -> list:
    """As tests.helpers.e2e.greedy: text and per-token logprobs, one prompt a request."""
    out = []
    for prompt in PROMPTS:
        request = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                   "seed": 0, "logprobs": 1}
        req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            choice = json.load(resp)["choices"][0]
        out.append([choice["text"], choice["logprobs"]["token_logprobs"]])
    return out


def main(argv: list[str]) -> None:
    if argv[0] == "wait":
        print(json.dumps(wait(argv[1], float(argv[2]))))
    elif argv[0] == "greedy":
        print(json.dumps(greedy(argv[1], argv[2])))
    else:
        from vllm_ascend.model_loader.netloader.client import query_seed

        print(json.dumps([query_seed(a) for a in argv[1:]]))


if __name__ == "__main__":
    main(sys.argv[1:])
