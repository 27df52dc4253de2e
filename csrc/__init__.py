"""C++ and CUDA sources of the kernels (shipped as package data; built on first use)."""
