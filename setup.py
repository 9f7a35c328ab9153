"""Only one thing pyproject.toml cannot say: the wheel carries the example configuration
and the load profiles (conf/repository.toml, conf/loadtest/*.toml) inside the package, as
repository_server/conf, where `smki-repository config show --defaults` finds them. The sdist
carries conf/ itself (MANIFEST.in)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = ["repository.toml", "loadtest/*.toml"]


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        here = Path(__file__).resolve().parent / "conf"
        target = Path(self.build_lib) / "repository_server" / "conf"
        for pattern in CONF:
            for src in sorted(here.glob(pattern)):
                dest = target / src.relative_to(here)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(src), str(dest))


setup(cmdclass={"build_py": BuildPyWithConf})
