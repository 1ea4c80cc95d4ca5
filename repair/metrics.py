"""Counters and gauges for /metrics, rendered in the Prometheus text format."""

import threading

HELP = {
    "llmnode_requests_total": ("counter", "HTTP requests answered, by status code."),
    "llmnode_repairs_started_total": ("counter", "Auto-repairs started."),
    "llmnode_repairs_completed_total": ("counter", "Auto-repairs that installed a verified blob."),
    "llmnode_repairs_failed_total": ("counter", "Auto-repairs that ended in an error."),
    "llmnode_download_bytes_total": ("counter", "Bytes received from registries."),
    "llmnode_verify_seconds_total": ("counter", "Seconds spent in full sha256 checks."),
    "llmnode_corrupted_blobs_found_total": ("counter", "Full checks that found a blob present but damaged."),
    "llmnode_repairs_in_progress": ("gauge", "Repairs running now."),
    "llmnode_endpoint_requests_total": ("counter", "API requests, by route."),
    "llmnode_generated_tokens_total": ("counter", "Tokens generated (chat and completions)."),
    "llmnode_embedded_tokens_total": ("counter", "Tokens read to make embeddings."),
    "llmnode_verified_loads_total": ("counter", "Loads of weights from disk, each verified alongside."),
    "llmnode_scrub_passes_total": ("counter", "Background scrub passes over every blob."),
    "llmnode_scrub_errors_total": ("counter", "Unexpected errors the scrubber logged and went on from."),
}


class Metrics:
    def __init__(self):
        # Guards _values: (name, labels tuple) -> number.
        self._lock = threading.Lock()
        self._values = {}

    def inc(self, name, value=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def get(self, name, **labels):
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def render(self):
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, (kind, text) in HELP.items():
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            series = sorted((k[1], v) for k, v in values.items() if k[0] == name) or [((), 0)]
            for labels, value in series:
                label_text = ",".join('%s="%s"' % kv for kv in labels)
                lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "", _num(value)))
        return "\n".join(lines) + "\n"


def _num(value):
    return repr(round(value, 6)) if isinstance(value, float) else str(value)
