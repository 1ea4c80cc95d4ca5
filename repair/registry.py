"""Registry client: the OCI distribution API for manifests and blobs, over requests."""

import base64
import logging
import re
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.utils import parse_dict_header

from conf import is_loopback
from repair.errors import BadRange, DownloadError, NetworkError, RangesUnsupported, RegistryHTTPError
from repair.names import DEFAULT_HOST
from repair.retry import parse_retry_after

MANIFEST_ACCEPT = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
))
MAX_REDIRECTS = 10
MAX_MANIFEST_BYTES = 4 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

log = logging.getLogger("llmnode.download")


class RegistryClient:
    """Talks to the registry a model name points at; LLM_REGISTRY_URL stands in for the default host."""

    def __init__(self, registry_url, insecure_hosts=(), session=None, timeout=(10.0, 30.0),
                 credentials=None):
        self.registry_url = registry_url.rstrip("/")
        self.insecure_hosts = tuple(insecure_hosts)
        # "user:password", sent only to token endpoints and to a registry's own host.
        self._basic = tuple(credentials.split(":", 1)) if credentials and ":" in credentials else None
        if session is None:
            # Room for every connection of a parallel download (and a few requests besides).
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=32)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self.session.headers.setdefault("User-Agent", "llmnode")
        self.timeout = timeout
        # (host, scope) -> Authorization value; written by request threads, a lost race only refetches.
        self._tokens = {}

    def base_url(self, ref):
        if ref.host == DEFAULT_HOST:
            return self.registry_url
        hostname = ref.host.partition(":")[0]
        scheme = "http" if is_loopback(hostname) or hostname in self.insecure_hosts else "https"
        return "%s://%s" % (scheme, ref.host)

    def manifest_url(self, ref, digest=None):
        return "%s/v2/%s/manifests/%s" % (self.base_url(ref), ref.repository, digest or ref.tag)

    def blob_url(self, ref, digest):
        return "%s/v2/%s/blobs/%s" % (self.base_url(ref), ref.repository, digest)

    def get_manifest(self, ref, digest=None):
        """The raw manifest bytes of a model: the one its tag names now, or with `digest`
        (`sha256:<hex>`) the one pinned."""
        url = self.manifest_url(ref, digest)
        resp = self.request(url, ref, {"Accept": MANIFEST_ACCEPT}, stream=True)
        raw = bytearray()
        with resp:
            try:
                for chunk in resp.iter_content(65536):
                    raw += chunk
                    if len(raw) > MAX_MANIFEST_BYTES:
                        raise DownloadError("manifest larger than %d bytes" % MAX_MANIFEST_BYTES,
                                            cause="registry error")
            except requests.RequestException as e:
                raise NetworkError("reading %s: %s" % (url, e)) from e
        return bytes(raw)

    def blob_bytes(self, ref, digest, start=0, end=None, total=None, chunk=1 << 20, whole_ok=False):
        """Bytes `start`..`end` (inclusive; to the end of a `total`-byte blob when `end` is None)
        of a blob, as an iterator of chunks. The one place a blob response is checked: status,
        Content-Range, length (short or long bodies), and `requests` errors become ours.

        A registry that answers a range with the whole blob (200): with `whole_ok` the bytes
        before `start` are skipped; otherwise RangesUnsupported, so a caller splitting a blob
        into parts can fall back to one connection."""
        last = end if end is not None else total - 1
        want = last - start + 1
        resp = self.open_blob(ref, digest, start=start, end=end)
        with resp:
            skip = 0
            if resp.status_code == 206:
                check_content_range(resp, start, end)
            elif resp.status_code != 200:
                raise RegistryHTTPError(resp.status_code, resp.url)
            elif start or end is not None:
                if not whole_ok:
                    raise RangesUnsupported()
                log.info("registry ignored a Range request for %s; skipping %d bytes", digest, start)
                skip = start
            got = 0
            try:
                for piece in resp.iter_content(chunk):
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                        if not piece:
                            continue
                    if got + len(piece) > want:
                        raise DownloadError("more than the %d bytes asked for from byte %d of %s"
                                            % (want, start, digest), cause="size mismatch")
                    got += len(piece)
                    yield piece
            except requests.RequestException as e:
                raise NetworkError("reading %s at byte %d: %s" % (digest, start + got, e)) from e
        if got < want:
            raise NetworkError("body of %s ended at byte %d of %d" % (digest, start + got, last + 1))

    def open_blob(self, ref, digest, start=0, end=None):
        """A streaming response for a blob, from byte `start` (to `end`, inclusive) on; the
        caller checks the status."""
        if end is not None:
            headers = {"Range": "bytes=%d-%d" % (start, end)}
        else:
            headers = {"Range": "bytes=%d-" % start} if start else {}
        return self.request(self.blob_url(ref, digest), ref, headers, stream=True)

    def request(self, url, ref, headers, stream):
        """GET with token auth and redirects; credentials never leave the registry's own host."""
        origin = urlsplit(url).netloc
        scope = "repository:%s:pull" % ref.repository
        challenged = False
        for _hop in range(MAX_REDIRECTS + 1):
            send = dict(headers)
            host = urlsplit(url).netloc
            token = self._tokens.get((host, scope))
            if token and host == origin:
                send["Authorization"] = token
            try:
                resp = self.session.get(url, headers=send, stream=stream,
                                        timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as e:
                raise NetworkError("GET %s: %s" % (url, e)) from e
            if resp.is_redirect:
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                continue
            if resp.status_code == 401 and host == origin and not challenged:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                challenged = True
                self._tokens[(host, scope)] = self._authorization(challenge, scope, url)
                continue
            if resp.status_code >= 400:
                resp.close()
                err = RegistryHTTPError(resp.status_code, url)
                err.server_retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise err
            return resp
        raise DownloadError("more than %d redirects from %s" % (MAX_REDIRECTS, origin),
                            cause="redirect loop")

    def _authorization(self, challenge, scope, url):
        """The Authorization header value that answers a 401's challenge."""
        if challenge.strip().lower().startswith("basic") and self._basic:
            return "Basic " + base64.b64encode(":".join(self._basic).encode()).decode()
        params = parse_bearer_challenge(challenge)
        realm = params.pop("realm", None)
        if not realm:
            raise RegistryHTTPError(401, url)
        params.setdefault("scope", scope)
        url = realm + ("&" if "?" in realm else "?") + urlencode(params)
        try:
            resp = self.session.get(url, timeout=self.timeout, auth=self._basic)
        except requests.RequestException as e:
            raise NetworkError("token from %s: %s" % (realm, e)) from e
        if resp.status_code != 200:
            raise RegistryHTTPError(resp.status_code, realm)
        try:
            body = resp.json()
        except ValueError as e:
            raise DownloadError("token endpoint sent no JSON", cause="registry error") from e
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise DownloadError("token endpoint sent no token", cause="registry error")
        return "Bearer " + token


def check_content_range(resp, start, end=None):
    """Refuse a 206 whose Content-Range does not start at `start` (and end at `end`, if given)."""
    header = resp.headers.get("Content-Range", "")
    m = _CONTENT_RANGE.fullmatch(header.strip())
    if not m or int(m.group(1)) != start or (end is not None and int(m.group(2)) != end):
        raise BadRange("asked for bytes %d-%s, got Content-Range %r"
                       % (start, "" if end is None else end, header))


def parse_bearer_challenge(header):
    """`Bearer realm="…",service="…",scope="…"` -> dict; {} for anything else."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    # requests' parser splits on the commas outside quotes (a scope holds commas).
    return {key.strip().lower(): value for key, value in parse_dict_header(rest).items()
            if value is not None}
