"""Shipping vLLM's compile cache from a seed to a client (``COMPILE_CACHE``).

Without ``--enforce-eager`` a vLLM worker compiles its model during warm-up and keeps
the result under ``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<H>/``: an
``inductor_cache/`` and ``rank_<rank>_<dp index>/model``, the bundled artifact, written
last (vllm/compilation/decorators.py:547-585, vLLM 0.32). ``H`` is the sha256 of
vLLM's compile factors (environment, ``VllmConfig.compute_hash()``, inductor's
factors; compilation/caching.py:572) plus the compiled module's own key
(decorators.py:256). An instance that finds ``<H>/rank_x_y/model`` loads it instead of
compiling.

So a client that got its weights from a seed computes its own ``H`` names (it knows its
config at ``load_weights``), asks the same seed for exactly those, receives the files
with their digests, and moves them into its own cache root only once every byte is
verified. A seed sends only what lies under the requested ``<H>/inductor_cache/`` and
``<H>/<rank dir>/``, regular files only, never through a symlink.

The cache is code: pickles, Python files that are executed and shared objects that are
loaded (built with ``-march=native``). Receiving it runs the seed's code, so the policy
(``NetloaderConfig.compile_cache_enabled``) asks for a shared secret unless the
operator opted in, and a client refuses a cache built on a host that differs in CPU,
vector ISA or compiler (``host_signature``). Every failure here ends as a log line and
"no cache": the instance then compiles as it would have anyway.
"""
