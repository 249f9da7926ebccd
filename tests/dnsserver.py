"""A real DNS server for the end-to-end tests (dnslib; UDP and TCP on
127.0.0.1, one free port for both).

The zone lives in memory and changes while the server runs; every answer
has TTL 0, so a resolver sees a change at once. What it answers:

- a name with records of the type asked: NOERROR with them;
- a name with records of other types only (NODATA): NOERROR, no answer, an
  SOA in the authority section;
- a name marked with `nxdomain()`, or an unknown name under a zone marked
  with `authoritative()`: NXDOMAIN (with the SOA);
- a name marked with `servfail()`, and every other name: SERVFAIL. So mail
  to a domain a test did not set up is deferred (a temporary DNS error),
  never looked up on the real network.

Names are compared case-insensitively, without the trailing dot.

    server = DNSServer().start()
    server.add_mx("b.test", 10, "mx.b.test")
    server.add_a("mx.b.test", "127.0.0.1")
    ... server.address == "127.0.0.1:PORT"
    server.stop()
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from dnslib import AAAA, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel
from dnslib.server import DNSHandler, DNSLogger, TCPServer, UDPServer

LOCALHOST = "127.0.0.1"
TTL = 0


def norm(name: str) -> str:
    """A domain name as the zone keys it: lower case, no trailing dot."""
    return name.strip().rstrip(".").lower()


def _rdata(rtype: str, value: object):
    if rtype == "A":
        return A(str(value))
    if rtype == "AAAA":
        return AAAA(str(value))
    if rtype == "MX":
        preference, exchange = value
        # "." is the null MX (RFC 7505).
        return MX(DNSLabel(norm(exchange) or "."), int(preference))
    if rtype == "TXT":
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        # A TXT record is a list of character-strings of at most 255 bytes
        # (RFC 1035 3.3.14); long ones (DKIM keys) are split, as zone files do.
        return TXT([data[i:i + 255] for i in range(0, len(data), 255)] or [b""])
    raise ValueError(f"unsupported record type {rtype}")


@dataclass(frozen=True)
class Query:
    name: str     # normalised
    qtype: str    # "A", "MX", ...
    rcode: str    # "NOERROR", "NXDOMAIN", "SERVFAIL"


class RecordAdders:
    """The typed ways to add a record, over the class's own `add`."""

    def add(self, name: str, rtype: str, value: object) -> None:
        raise NotImplementedError

    def add_a(self, name: str, address: str) -> None:
        self.add(name, "A", address)

    def add_aaaa(self, name: str, address: str) -> None:
        self.add(name, "AAAA", address)

    def add_mx(self, name: str, preference: int, exchange: str) -> None:
        self.add(name, "MX", (preference, exchange))

    def add_null_mx(self, name: str) -> None:
        """`name. MX 0 .`: the domain accepts no mail (RFC 7505)."""
        self.add(name, "MX", (0, "."))

    def add_txt(self, name: str, text: str | bytes) -> None:
        self.add(name, "TXT", text)


class DNSServer(RecordAdders):
    """The server and its zone. Thread-safe: tests change the zone while
    the server's threads answer."""

    def __init__(self, address: str = LOCALHOST):
        self.host = address
        self.port: int | None = None
        self._lock = threading.Lock()
        self._records: dict[str, list[tuple[str, object]]] = {}
        self._nxdomain: set[str] = set()
        self._servfail: set[str] = set()
        self._zones: set[str] = set()
        self.queries: list[Query] = []
        self._servers: list = []
        self._threads: list[threading.Thread] = []

    # ---- running ---------------------------------------------------------

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, the form `[dns] servers` takes."""
        assert self.port is not None, "not started"
        return f"{self.host}:{self.port}"

    def start(self) -> "DNSServer":
        """Bind UDP and TCP on one free port and serve in threads."""
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data",
                          prefix=False)
        for _ in range(50):
            udp = UDPServer((self.host, 0), DNSHandler)
            port = udp.server_address[1]
            try:
                tcp = TCPServer((self.host, port), DNSHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.port = port
        for server in (udp, tcp):
            server.resolver = self
            server.logger = quiet
            thread = threading.Thread(target=server.serve_forever,
                                      kwargs={"poll_interval": 0.1},
                                      name=f"dns-{port}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and close both sockets. Safe to call twice."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._threads = []

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the zone --------------------------------------------------------

    def add(self, name: str, rtype: str, value: object) -> None:
        """Add one record; `value` is an address (A, AAAA), a (preference,
        exchange) pair (MX) or the text (TXT)."""
        rtype = rtype.upper()
        _rdata(rtype, value)   # fail here, not in the server thread
        with self._lock:
            self._records.setdefault(norm(name), []).append((rtype, value))

    def remove(self, name: str, rtype: str | None = None, value: object = None) -> None:
        """Remove the records of `name`: all, all of one type, or one."""
        key = norm(name)
        with self._lock:
            kept = [(t, v) for t, v in self._records.get(key, [])
                    if not (rtype is None or (t == rtype.upper()
                                              and (value is None or v == value)))]
            if kept:
                self._records[key] = kept
            else:
                self._records.pop(key, None)

    def nxdomain(self, name: str) -> None:
        """Answer NXDOMAIN for `name` (whatever records it has)."""
        with self._lock:
            self._nxdomain.add(norm(name))

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for `name` (whatever records it has)."""
        with self._lock:
            self._servfail.add(norm(name))

    def authoritative(self, zone: str) -> None:
        """Unknown names at or under `zone` get NXDOMAIN, not SERVFAIL."""
        with self._lock:
            self._zones.add(norm(zone))

    def forget(self, name: str) -> None:
        """Remove every record and mark of `name` (and its zone mark)."""
        key = norm(name)
        with self._lock:
            self._records.pop(key, None)
            self._nxdomain.discard(key)
            self._servfail.discard(key)
            self._zones.discard(key)

    def queried(self, name: str, qtype: str | None = None) -> list[Query]:
        """The queries received for `name` (of `qtype` if given), in order."""
        key = norm(name)
        with self._lock:
            return [q for q in self.queries
                    if q.name == key and (qtype is None or q.qtype == qtype.upper())]

    # ---- answering (dnslib's resolver interface) ---------------------------

    def _zone_of(self, name: str) -> str | None:
        """The longest authoritative zone that holds `name`."""
        found = [z for z in self._zones if name == z or name.endswith("." + z)]
        return max(found, key=len) if found else None

    def _soa(self, name: str) -> RR:
        zone = self._zone_of(name) or ".".join(name.split(".")[-2:])
        return RR(zone + ".", QTYPE.SOA, ttl=TTL,
                  rdata=SOA(f"ns.{zone}.", f"hostmaster.{zone}.", (1, 60, 60, 60, TTL)))

    def resolve(self, request, handler):
        reply = request.reply()
        name = norm(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype)
        with self._lock:
            records = list(self._records.get(name, ()))
            if name in self._servfail:
                rcode = RCODE.SERVFAIL
            elif name in self._nxdomain:
                rcode = RCODE.NXDOMAIN
            elif name in self._records:
                rcode = RCODE.NOERROR
            elif self._zone_of(name) is not None:
                rcode = RCODE.NXDOMAIN
            else:
                rcode = RCODE.SERVFAIL
            self.queries.append(Query(name, str(qtype), RCODE.get(rcode)))
        reply.header.rcode = rcode
        if rcode == RCODE.SERVFAIL:
            return reply
        if rcode == RCODE.NOERROR:
            for rtype, value in records:
                if rtype == qtype:
                    reply.add_answer(RR(name + ".", getattr(QTYPE, rtype), ttl=TTL,
                                        rdata=_rdata(rtype, value)))
        if not reply.rr:
            reply.add_auth(self._soa(name))
        return reply


class DNSRecords(RecordAdders):
    """A test's view of the shared server: what it adds through this handle
    is removed when the test ends (`clear()`), so tests leave no records
    behind for the next one. `unique("b")` gives a fresh domain name
    ("b-1a2b3c4d.test"), so no two tests ever share a name."""

    def __init__(self, server: DNSServer):
        self.server = server
        self._names: set[str] = set()

    @property
    def address(self) -> str:
        return self.server.address

    @staticmethod
    def unique(label: str = "d") -> str:
        return f"{label}-{uuid.uuid4().hex[:8]}.test"

    def _track(self, name: str) -> None:
        self._names.add(norm(name))

    def add(self, name: str, rtype: str, value: object) -> None:
        self._track(name)
        self.server.add(name, rtype, value)

    def mail_domain(self, domain: str, host: str | None = None,
                    address: str = LOCALHOST, preference: int = 10) -> str:
        """`domain MX preference host` and `host A address`; host defaults
        to `mx.<domain>`. Returns the host name."""
        host = host or f"mx.{domain}"
        self.add_mx(domain, preference, host)
        self.add_a(host, address)
        return host

    def remove(self, name: str, rtype: str | None = None, value: object = None) -> None:
        self.server.remove(name, rtype, value)

    def nxdomain(self, name: str) -> None:
        self._track(name)
        self.server.nxdomain(name)

    def servfail(self, name: str) -> None:
        self._track(name)
        self.server.servfail(name)

    def authoritative(self, zone: str) -> None:
        self._track(zone)
        self.server.authoritative(zone)

    def queried(self, name: str, qtype: str | None = None) -> list[Query]:
        return self.server.queried(name, qtype)

    def clear(self) -> None:
        """Forget every name this handle touched."""
        for name in self._names:
            self.server.forget(name)
        self._names.clear()
