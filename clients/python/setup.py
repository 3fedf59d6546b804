"""Only the modules a caller of the public API needs, taken from the main tree (../../cardcheck):
the client, the refusals it raises, and the public protos' stubs. Everything else in those
packages belongs to the servers and stays out of this distribution."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT_MODULES = {
    "cardcheck": {"__init__", "client", "refusals"},
    "cardcheck.v1": {"__init__", "common_pb2", "gateway_pb2", "gateway_pb2_grpc"},
}


class BuildClientModules(build_py):
    def find_package_modules(self, package, package_dir):
        wanted = CLIENT_MODULES[package]
        return [found for found in super().find_package_modules(package, package_dir) if found[1] in wanted]

    def find_data_files(self, package, src_dir):
        # Stubs (.pyi) come along by default: only those of the modules shipped, and py.typed.
        wanted = CLIENT_MODULES[package]
        return [
            name
            for name in super().find_data_files(package, src_dir)
            if Path(name).name == "py.typed" or Path(name).stem in wanted
        ]

    def run(self):
        # A build left behind may hold modules no longer shipped; start from nothing.
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()


# The metadata is written next to this file, not into the main tree where it would pass for
# an installed distribution on a path that holds the tree.
setup(cmdclass={"build_py": BuildClientModules}, options={"egg_info": {"egg_base": "."}})
