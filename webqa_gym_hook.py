"""Register the WebQA envs with Gymnasium the moment Gymnasium is imported.

Gymnasium 1.x no longer loads ``gymnasium.envs`` entry points (0.26-0.29 did), so
``gym.make("WebQA-v0")`` in a fresh interpreter needs help. ``webqa_gym.pth``, which setup.py
puts at the root of site-packages in every kind of install (regular, wheel, editable in any
setuptools mode), imports this module at start-up; it costs one entry on ``sys.meta_path`` and
imports nothing heavy. When ``gymnasium`` is first imported, it imports ``envs``, whose
``__init__`` registers the ids (``envs.REGISTRY``). Any failure here is swallowed: the hook must
never break Python. Without the hook (e.g. ``python -S``), Gymnasium's own module form
``gym.make("envs:WebQA-v0")`` imports ``envs`` first and works the same.
"""
import importlib.util
import sys


def _register() -> None:
    if "envs" in sys.modules:  # envs is importing gymnasium itself and will register
        return
    try:
        import envs  # noqa: F401
    except Exception:  # pragma: no cover - never break the user's interpreter
        pass


class _GymnasiumHook:
    def find_spec(self, name, path=None, target=None):
        if name != "gymnasium":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:  # pragma: no cover
            pass
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "gymnasium" in sys.modules:
        _register()
    elif not any(isinstance(f, _GymnasiumHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _GymnasiumHook())
