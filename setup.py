"""The one compiled part: loader_server.pipeline._jpegregion, region decoding of JPEGs with the system's
libjpeg(-turbo) (Debian/Ubuntu: `apt-get install gcc libjpeg62-turbo-dev`, or `libjpeg-turbo-devel`).

Optional: without a C compiler or libjpeg's headers the package installs without it, and the server
decodes random crops with simplejpeg as before (slower: README.md, "Dependencies, and why").
Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("loader_server.pipeline._jpegregion", ["loader_server/pipeline/_jpegregion.c"],
                             # dl: dladdr() (loaded_library), in libc itself from glibc 2.34, in libdl before
                             libraries=["jpeg", "dl"], optional=True)])
