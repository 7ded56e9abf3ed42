"""gradad-runtime's build: the light modules of ../python/gradad only (see pyproject.toml)."""
from setuptools import setup
from setuptools.command.build_py import build_py

# the modules of the gradad package itself that the runtime ships (gradad.deploy goes whole)
LIGHT_MODULES = {"__init__", "__main__", "cli", "io_utils", "image_files", "html_page", "prediction_files"}


class LightBuildPy(build_py):
    """build_py that leaves out gradad's torch-side modules."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if package != "gradad" or m[1] in LIGHT_MODULES]


setup(cmdclass={"build_py": LightBuildPy})
