"""llm: a JAX-native codebase for the whole life of a language model.

Install for development with pinned versions:
    pip install -r requirements.lock -e .
"""

from setuptools import find_packages, setup

setup(
    name="llm",
    version="0.1.0",
    description="Curate, pretrain, fine-tune, evaluate, compress and serve LLMs in JAX.",
    python_requires=">=3.11",
    packages=find_packages(include=["llm", "llm.*", "experiments", "tools"]),
    package_data={"llm.data.curate": ["assets/*.tsv"],  # the toxicity classifier's training set
                  "llm.kernels": ["cpu/*.cc"]},  # the CPU attention kernel, compiled on use
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8",
        "gin-config>=0.5.0",
        "sentencepiece>=0.2",
        "numpy>=2.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    entry_points={"console_scripts": ["llm-lm-eval = llm.eval.harness:main"]},
    extras_require={
        # seqio / TFDS bring TensorFlow; imported lazily only where used.
        # Data curation: offline language ID, profanity list, zstd sources. Apache Beam is
        # installed separately (requirements-beam.txt, --no-deps; see the comment there).
        "curate": ["py3langid>=0.3", "better-profanity>=0.7", "zstandard>=0.22", "pyarrow>=14",
                   "spacy>=3.8"],  # spaCy: the datatrove-compatible filter mode (no model)
        "tf": ["seqio>=0.0.20", "tensorflow-datasets>=4.9.10", "tensorflow>=2.21"],
        # google-cloud-storage: orbax lists gs:// checkpoint steps through it.
        "tpu": ["jax[tpu]", "google-cloud-storage>=3.0"],
        "gpu": ["jax[cuda12]"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "ruff>=0.6"],
        # lm-evaluation-harness adapter (llm/eval/harness.py, model name `llm_jax`).
        "eval": ["lm-eval==0.4.13", "PyYAML>=6"],
        # OpenAI-compatible server (llm/serve/server.py); the test clients are openai, httpx and
        # schemathesis, and lm-eval's API models need tenacity.
        "serve": ["fastapi>=0.115", "uvicorn>=0.30", "prometheus-client>=0.20", "httpx>=0.27",
                  "openai>=1.40", "schemathesis>=4", "tenacity>=8"],
        # Hugging Face / GGUF interop (llm/interop, tools/hf.py, tools/export_gguf.py); torch is
        # transformers' backend (CPU wheel), used by the parity tests.
        "interop": ["transformers==5.24.0", "torch==2.13.0", "safetensors==0.8.0",
                    "tokenizers==0.23.3", "gguf==0.19.0",
                    # LiteRT's interpreter runs tools/export_edge.py's .tflite files
                    "ai-edge-litert==2.3.0"],
        # llama.cpp itself (tools/llamacpp_worker.py: the GGUF parity test and bench_serve's
        # peer). It compiles llama.cpp from source (~9 min), so CI leaves it out and the test
        # skips; docs/serving.md builds it into a side virtualenv, /tmp/llamacpp-venv.
        "llamacpp": ["llama-cpp-python==0.3.36"],
    },
)
