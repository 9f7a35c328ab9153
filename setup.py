"""Two things pyproject.toml cannot say:

* the wheel carries the example configuration and the load profiles (conf/repository.toml,
  conf/loadtest/*.toml) inside the package, as repository_server/conf, where
  `smki-repository config show --defaults` finds them (the sdist carries conf/ itself,
  MANIFEST.in);
* the LDAP short way's innermost loops in C (repository_server/listeners/ldap/_hot.c), built
  when a C compiler and Python's headers are there and skipped with a warning when not: the
  server then does the same work in Python (`smki-repository --version` says which)."""

from pathlib import Path

from setuptools import Extension, setup
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


HOT = Extension("repository_server.listeners.ldap._hot",
                ["repository_server/listeners/ldap/_hot.c"], optional=True,
                extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"])

setup(cmdclass={"build_py": BuildPyWithConf}, ext_modules=[HOT])
