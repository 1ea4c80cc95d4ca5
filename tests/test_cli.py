"""The command line: what `python llmnode.py` says at start."""

from tests.conftest import node_env, run_cli


def store_lines(node):
    return [line.rstrip("\n") for line in node.lines if line.startswith("[INFO] store ")]


def test_serve_on_an_empty_store_names_it_and_the_command_that_pulls_a_model(models_dir, registry,
                                                                              start_node):
    node = start_node(node_env(models_dir, registry.url))
    assert store_lines(node) == ["[INFO] store %s holds no models; pull one with: "
                                 "python llmnode.py pull smollm2:135m" % models_dir]


def test_serve_names_the_store_and_how_many_models_it_holds(models_dir, registry, tiny_gguf, start_node):
    registry.add_model("library/other", "1", tiny_gguf)
    env = node_env(models_dir, registry.url)
    for name in ("gpt-oss:7b", "other:1"):
        assert run_cli("pull", name, env=env).returncode == 0
    node = start_node(env)
    assert store_lines(node) == ["[INFO] store %s holds 2 models" % models_dir]
