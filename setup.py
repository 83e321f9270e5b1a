"""Build hook for the optional C extension; the metadata lives in setup.cfg.

`qkd_jax.data._jpeg_crop` (cropped, DCT-scaled JPEG decode + Pillow-identical resize) needs a C
compiler and libjpeg(-turbo) headers (Debian: libjpeg62-turbo-dev). Where either is missing the
build prints a warning and goes on: the JPEG input path then decodes whole images
(qkd_jax/data/jpeg_augment.py), with the same output up to the DCT-scaling tolerance.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "qkd_jax.data._jpeg_crop",
            sources=["qkd_jax/data/_jpeg_crop.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
