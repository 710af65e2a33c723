from setuptools import find_packages, setup

setup(
    name="vllm-ascend-netloader",
    version="0.1.0",
    description="Netloader: start a vLLM instance with weights received from a running one",
    packages=find_packages(include=["vllm_ascend", "vllm_ascend.*"]),
    python_requires=">=3.10",
    install_requires=["blake3", "redis>=5"],
    entry_points={
        "vllm.general_plugins": [
            "netloader = vllm_ascend.model_loader.netloader:register",
        ],
        "console_scripts": [
            "netloader-query = vllm_ascend.model_loader.netloader.query:main",
            "netloader-digest = vllm_ascend.model_loader.netloader.exact_checkpoint:main",
        ],
    },
)
