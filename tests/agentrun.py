"""The coding agents as their users run them: the pinned npm packages (installed by `tox -e agents`
in the user's cache), each run with a fresh HOME, its working directory as PWD and nothing set but
the node's address, the model and a dummy key; every run time bound."""

import json
import os
import subprocess
import time

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.328"
CODEX = "@openai/codex@0.169.0"
AGENTS_DIR = os.path.join(os.environ.get("LLMNODE_MODEL_CACHE", os.path.expanduser("~/.cache/llmnode")),
                          "agents")
# Each agent's turn on the tiny model takes seconds; a stalled stream (Codex waits 300 s on a
# silent one before it reconnects) fails the run well before that.
TIMEOUT = 240


def binary(name):
    """An installed agent's command; a missing one names the tox env that installs it."""
    path = os.path.join(AGENTS_DIR, "node_modules", ".bin", name)
    assert os.path.exists(path), "%s is not installed: run `tox -e agents` (npm install into %s)" % (
        name, AGENTS_DIR)
    return path


class Run:
    """One finished agent run: its exit code, output and wall time."""

    def __init__(self, proc, seconds):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.seconds = seconds

    def __repr__(self):
        return "exit %s after %.1fs\nstdout: %s\nstderr: %s" % (
            self.returncode, self.seconds, self.stdout[-3000:], self.stderr[-3000:])


def _run(cmd, root, env, timeout):
    """Run `cmd` in root/work with root/home as a fresh HOME: only PATH, HOME, PWD and `env` set,
    so nothing of the developer's own settings reaches the agent."""
    home, work = os.path.join(root, "home"), os.path.join(root, "work")
    os.makedirs(home, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "hello.py"), "w") as f:
        f.write("print('hello')\n")
    # PWD too: some agents read it rather than the process's working directory.
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "PWD": work, **env}
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, env=full, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    return Run(proc, time.monotonic() - started)


def run_claude(base_url, model, root, task, timeout=TIMEOUT):
    """`claude -p TASK --max-turns 2 --output-format json` with ANTHROPIC_BASE_URL at the node."""
    return _run([binary("claude"), "-p", task, "--max-turns", "2", "--output-format", "json",
                 "--model", model], root,
                {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-llmnode-dummy"}, timeout)


def claude_result(run):
    """Claude Code's JSON result (the last line of its output)."""
    return json.loads(run.stdout.strip().splitlines()[-1])


CODEX_CONFIG = """\
model = "{model}"
model_provider = "llmnode"

[model_providers.llmnode]
name = "llmnode"
base_url = "{base_url}/v1"
wire_api = "responses"
"""


def run_codex(base_url, model, root, task, timeout=TIMEOUT, args=()):
    """`codex exec --skip-git-repo-check [ARGS] TASK` with a provider entry for the node in ~/.codex."""
    codex_home = os.path.join(root, "home", ".codex")
    os.makedirs(codex_home, exist_ok=True)
    with open(os.path.join(codex_home, "config.toml"), "w") as f:
        f.write(CODEX_CONFIG.format(model=model, base_url=base_url))
    return _run([binary("codex"), "exec", "--skip-git-repo-check", *args, task], root, {}, timeout)


def codex_usage(run):
    """Token usage summed over the `turn.completed` events of `codex exec --json`."""
    total = {}
    for line in run.stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("type") == "turn.completed":
            for key, value in (event.get("usage") or {}).items():
                total[key] = total.get(key, 0) + value
    return total
