"""Only here to put ``webqa_gym.pth`` at the root of site-packages in every kind of install, so
that ``gym.make("WebQA-v0")`` works in a fresh interpreter without ``import envs`` (the .pth runs
``webqa_gym_hook``; see there why Gymnasium 1.x needs it).

- Regular installs and wheels (``pip install .``, ``pip wheel .``, ``python -m build``): the file
  goes into ``build_lib``, whose contents become the wheel's root.
- Editable installs (PEP 660: ``pip install -e .`` in setuptools' lenient, strict or compat mode)
  do not ship ``build_lib``; setuptools' ``editable_wheel`` points ``install_lib`` at the editable
  wheel's root (where it writes data files too), so the file goes there.

The line is written here rather than copied from a file, so a build from the sdist (which does not
carry a loose .pth) works as well.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "webqa_gym.pth"
PTH_LINE = "import webqa_gym_hook; webqa_gym_hook.install()\n"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            root = Path(self.get_finalized_command("install").install_lib)
        else:
            root = Path(self.build_lib)
        root.mkdir(parents=True, exist_ok=True)
        (root / PTH_NAME).write_text(PTH_LINE, encoding="utf-8")


setup(cmdclass={"build_py": BuildWithPth})
