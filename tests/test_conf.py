import os
import re

import pytest

import conf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_apply_without_environment():
    s = conf.load(environ={})
    assert s.auto_repair is True
    assert s.repair_timeout_secs == 300
    assert s.port == 8081 and s.host == "127.0.0.1"
    assert s.models_dir == os.path.expanduser("~/.runtime/models")
    assert s.registry_url == "https://registry.ollama.ai"
    assert s.log_file is None


def test_environment_beats_conf_file_beats_default(tmp_path):
    path = tmp_path / "node.conf"
    path.write_text("[llmnode]\nport = 9000\nrepair_timeout_secs = 7\n")
    s = conf.load(environ={"LLM_PORT": "9100"}, conf_path=str(path))
    assert s.port == 9100
    assert s.repair_timeout_secs == 7


def test_flags_beat_environment():
    assert conf.load(environ={"LLM_PORT": "9100"}, flags={"port": "9200"}).port == 9200


@pytest.mark.parametrize("env, var", [
    ({"LLM_AUTO_REPAIR": "maybe"}, "LLM_AUTO_REPAIR"),
    ({"LLM_REPAIR_TIMEOUT_SECS": "0"}, "LLM_REPAIR_TIMEOUT_SECS"),
    ({"LLM_REPAIR_TIMEOUT_SECS": "ten"}, "LLM_REPAIR_TIMEOUT_SECS"),
    ({"LLM_PORT": "70000"}, "LLM_PORT"),
    ({"LLM_REGISTRY_URL": "ftp://x"}, "LLM_REGISTRY_URL"),
    ({"LLM_REGISTRY_URL": "http://mirror.example"}, "LLM_REGISTRY_URL"),
])
def test_invalid_values_name_the_variable(env, var):
    with pytest.raises(conf.SettingsError, match=var):
        conf.load(environ=env)


def test_plain_http_allowed_for_loopback_and_listed_hosts():
    assert conf.load(environ={"LLM_REGISTRY_URL": "http://127.0.0.1:5000"}).registry_url
    s = conf.load(environ={"LLM_REGISTRY_URL": "http://mirror.lan",
                           "LLM_INSECURE_REGISTRIES": "mirror.lan"})
    assert s.insecure_registries == ("mirror.lan",)


def test_unknown_conf_keys_are_refused(tmp_path):
    path = tmp_path / "node.conf"
    path.write_text("[llmnode]\nprot = 9000\n")
    with pytest.raises(conf.SettingsError, match="prot"):
        conf.load(environ={}, conf_path=str(path))


def test_example_conf_and_readme_list_every_setting():
    example = open(os.path.join(ROOT, "conf", "llmnode.conf.example")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    example_keys = set(re.findall(r"^#?\s*(\w+) =", example, re.M))
    assert example_keys == {s.key for s in conf.SETTINGS}
    for s in conf.SETTINGS:
        assert "`%s`" % s.env in readme, s.env


def test_example_conf_loads_to_the_defaults(tmp_path):
    example = open(os.path.join(ROOT, "conf", "llmnode.conf.example")).read()
    path = tmp_path / "c.conf"
    path.write_text(re.sub(r"^# (\w+ =)", r"\1", example, flags=re.M))
    assert vars(conf.load(environ={}, conf_path=str(path))) == vars(conf.load(environ={}))


@pytest.mark.parametrize("files, cores", [
    ({}, 4),  # no cgroup limit: the affinity
    ({"cpu.max": "max 100000\n"}, 4),
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 cores: one thread the quota never throttles
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
])
def test_zero_cpu_threads_means_the_cores_this_process_may_use(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert conf.usable_cores(affinity=lambda pid: {0, 1, 2, 5}, cgroup_root=str(tmp_path)) == cores
