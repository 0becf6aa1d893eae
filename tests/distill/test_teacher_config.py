"""Each teacher backend has its own small config dataclass, registered with its builder in
``distill.teachers.BACKENDS``; ``teacher.<key>=`` takes exactly the chosen backend's keys (under
``teacher=auto``: those of the backend the method picks), and any other key fails by name."""
from dataclasses import fields, is_dataclass

import pytest
from omegaconf import OmegaConf

from distill.config import CONF_DIR, ConfigError, resolve, resolve_saved, to_yaml
from distill.methods import METHODS, get_method
from distill.run import main
from distill.teachers import BACKENDS, HttpTeacherConfig, NoneTeacherConfig, make_teacher

PRESETS = sorted(p.stem for p in (CONF_DIR / "teacher").glob("*.yaml"))
URL = "http://127.0.0.1:8001/v1"


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "teacher" / f"{name}.yaml"))


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_every_backend_is_a_config_dataclass_and_a_builder(kind):
    backend = BACKENDS[kind]
    assert is_dataclass(backend.config) and callable(backend.build)
    first = fields(backend.config)[0]
    assert first.name == "kind" and first.default == kind
    assert "name" in {f.name for f in fields(backend.config)}  # the label logs and run.py print
    assert any(preset(p)["kind"] == kind for p in PRESETS), f"no distill/conf/teacher preset for {kind}"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_holds_kind_and_only_its_backends_keys(name):
    raw = preset(name)
    if raw["kind"] == "auto":
        assert raw == {"kind": "auto"}
        return
    config = BACKENDS[raw["kind"]].config
    assert set(raw) <= {f.name for f in fields(config)}, f"{name}.yaml has keys {config.__name__} lacks"
    cfg, _ = resolve([f"teacher={name}"] + ([f"teacher.url={URL}"] if raw["kind"] == "http" else []))
    assert type(cfg.teacher) is config
    from agents.models import resolve_dtype

    # a preset's dtype "fast" is resolved when the config is read (bfloat16 or float32, by machine)
    assert all(getattr(cfg.teacher, k) == (resolve_dtype(v) if k == "dtype" else v) for k, v in raw.items() if k != "url")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_auto_is_the_methods_default_teacher(method):
    cfg, _ = resolve([f"method={method}", "teacher=auto"])
    kind = get_method(method).default_teacher
    assert cfg.teacher.kind == kind and type(cfg.teacher) is BACKENDS[kind].config


def test_auto_takes_the_picked_backends_keys():
    cfg, _ = resolve(["method=ovd", "teacher.name=tiny", "teacher.batch_size=8"])  # the embedded (local) teacher
    assert (cfg.teacher.kind, cfg.teacher.name, cfg.teacher.batch_size) == ("local", "tiny", 8)
    cfg, _ = resolve(["model=small", "method=opd"])  # SmolLM2 itself, unless a name is given
    assert cfg.teacher.name == "small"
    cfg, _ = resolve(["model=small", "method=opd", "teacher.name=tiny"])
    assert cfg.teacher.name == "tiny"
    with pytest.raises(ConfigError, match=r"^teacher\.batch_size: not a key of teacher none \(teacher=auto picks none "
                                          r"for method grpo; known: kind, name\), got 3$"):
        resolve(["method=grpo", "teacher.batch_size=3"])


# (overrides, the key that is not the backend's, the backend)
OTHER_BACKENDS_KEY = [
    (["teacher=http", f"teacher.url={URL}", "teacher.batch_size=3"], "batch_size", "http"),
    (["teacher=http", f"teacher.url={URL}", "teacher.dtype=bfloat16"], "dtype", "http"),
    (["teacher=teacher", f"teacher.url={URL}"], "url", "local"),
    (["teacher=small", "teacher.timeout=5"], "timeout", "local"),
    (["teacher=self", "teacher.device=cpu"], "device", "self"),
    (["teacher=vllm", "teacher.batch_size=2"], "batch_size", "vllm"),
    (["teacher=none", "teacher.retries=1"], "retries", "none"),
    (["teacher=teacher", "teacher.nosuch=1"], "nosuch", "local"),
]


@pytest.mark.parametrize("case,key,kind", OTHER_BACKENDS_KEY, ids=[" ".join(c) for c, _, _ in OTHER_BACKENDS_KEY])
def test_a_key_the_backend_lacks_fails_by_name_listing_its_keys(case, key, kind):
    with pytest.raises(ConfigError) as err:
        resolve(case)
    msg = str(err.value)
    assert msg.startswith(f"teacher.{key}: not a key of teacher {kind} ("), msg
    assert "known: " + ", ".join(f.name for f in fields(BACKENDS[kind].config)) in msg, msg
    assert ", got " in msg


def test_the_command_line_says_it_in_one_line(capsys):
    assert main(["teacher=http", f"teacher.url={URL}", "teacher.batch_size=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: teacher.batch_size: not a key of teacher http (known: kind, url,")


def test_http_overrides_work():
    cfg, _ = resolve(["method=ovd", "teacher=http", f"teacher.url={URL}", "teacher.timeout=5", "teacher.retries=0",
                      "teacher.concurrency=2", "teacher.logprobs=true", "teacher.api_key=k", "teacher.tokenizer=teacher",
                      "teacher.name=served"])
    assert cfg.teacher == HttpTeacherConfig(url=URL, name="served", tokenizer="teacher", timeout=5.0, retries=0,
                                            concurrency=2, logprobs=True, api_key="k")
    # the kind can be switched by key too, with the keys of the backend it names
    cfg, _ = resolve(["teacher.kind=http", f"teacher.url={URL}", "teacher.timeout=5"])
    assert type(cfg.teacher) is HttpTeacherConfig and cfg.teacher.timeout == 5.0
    with pytest.raises(ConfigError, match=r"^teacher\.timeout: a number, got 'soon'$"):
        resolve(["teacher=http", f"teacher.url={URL}", "teacher.timeout=soon"])


def test_cfg_prints_only_the_backends_keys(capsys):
    assert main(["method=ovd", "teacher=http", f"teacher.url={URL}", "teacher.timeout=5", "--cfg"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert OmegaConf.to_container(printed.teacher) == {f.name: getattr(HttpTeacherConfig(url=URL, timeout=5.0), f.name)
                                                       for f in fields(HttpTeacherConfig)}


def test_saved_config_round_trips_and_an_older_flat_one_still_resumes():
    cfg, mcfg = resolve(["method=ovd", "teacher=http", f"teacher.url={URL}"])
    saved = OmegaConf.create(to_yaml(cfg, mcfg))
    again, _ = resolve_saved(saved, ["teacher.timeout=5"])
    assert again.teacher == HttpTeacherConfig(url=URL, timeout=5.0)
    with pytest.raises(ConfigError, match=r"^teacher\.batch_size: not a key of teacher http"):
        resolve_saved(saved, ["teacher.batch_size=2"])
    # a run directory written when the teacher was one flat 12-key node
    saved.teacher = {"kind": "http", "name": "", "dtype": "float32", "device": "auto", "url": URL, "tokenizer": "",
                     "timeout": 60.0, "retries": 2, "concurrency": 8, "logprobs": False, "api_key": "", "batch_size": 4}
    old, _ = resolve_saved(saved, [])
    assert old.teacher == HttpTeacherConfig(url=URL)


def test_make_teacher_goes_through_the_table():
    assert make_teacher(NoneTeacherConfig()) is None
    teacher = make_teacher(HttpTeacherConfig(url=URL, timeout=5.0, logprobs=True))  # no request is made
    assert type(teacher).__name__ == "HttpTeacher" and teacher.timeout == 5.0 and "logprobs" in teacher.capabilities
