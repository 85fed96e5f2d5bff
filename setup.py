from setuptools import setup

setup(cffi_modules=["vhostd/_native_build.py:ffibuilder"])
