"""vllm_ascend: this tree carries Netloader, a vLLM model loader that fills a new
instance's weights from a running instance (see vllm_ascend.model_loader.netloader)."""
