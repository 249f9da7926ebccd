"""A scripted SMTP server for the end-to-end tests: it plays a remote MX
that misbehaves on demand, where a real mailsrv cannot be made to (no
STARTTLS, no PIPELINING, a 451 to the first two tries, a 550 ...), and
records everything its clients did.

    with ScriptedSMTP(replies={"RCPT": ["451 4.3.0 try later", "250 2.1.5 Ok"]}) as mx:
        ... mx.port, mx.connection_count, mx.transactions

Replies: for each of MAIL, RCPT, DATA (the 354 or a refusal) and DOT (the
reply to the final dot) a string, a list of strings (taken in turn, one per
command of that kind over the server's whole life, the last one repeating),
or a function (Transaction, argument line) -> reply string. A reply
without its code's class 2 or 3 is a refusal: a refused MAIL opens no
transaction, a refused RCPT adds no accepted recipient, DATA with no
accepted recipient is answered `554 5.5.1` whatever the script says (RFC
2920 3.1).

A reply may also be `DROP`: the server closes the connection instead of
answering (for DOT: after reading the whole message, before its reply);
or, for DATA only, `DROP_DURING_DATA`: the server answers 354, reads the
first line of the message and closes the connection while the client is
still sending.

Commands are read line by line and answered in order, so a client that
pipelines (MAIL, RCPT..., DATA in one write) gets its replies in order. STARTTLS is
offered only with `tls=(certfile, keyfile)`.

The server listens on `address` (default 127.0.0.1; an IPv6 address such
as "::1" works too) and `port` (default: a free one). Several servers can
share a port on different loopback addresses (127.0.0.1, 127.0.0.2, ...),
as the MX hosts of one domain, all reached on `delivery.remote_port`, do.

A greeting of class 4 (`greeting="421 4.3.2 busy"`) is followed by closing
the connection (RFC 5321 3.8).

Pipelining (RFC 2920): before answering a command the client had to wait
for, the server looks whether more input is already there (allowing a
short grace time for it to arrive). Without PIPELINING in the current
EHLO reply that is every command and the end of the message data; with
it, only the commands that must end a group (EHLO, HELO, DATA, VRFY,
EXPN, TURN, NOOP, AUTH). Each such command line is recorded in
`Connection.unwaited` (all of them: `server.unwaited`). The time of
every command is kept too (`server.timed_commands("RCPT")`), for tests of
the retry schedule.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

from mailtest import LOCALHOST, wait_until

Reply = Union[str, list, Callable[["Transaction", str], str]]

DEFAULT_CAPABILITIES = ("PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES",
                        "SMTPUTF8", "DSN")
DEFAULT_REPLIES = {
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "DOT": "250 2.0.0 Ok: queued as SCRIPTED",
}
MAX_LINE = 65536
IDLE_TIMEOUT = 60   # a client silent this long is dropped
# Script replies that close the connection instead of answering.
DROP = "<drop the connection>"
DROP_DURING_DATA = "<354, then drop the connection during the data>"
# RFC 2920 3.1: commands after which a pipelining client must wait anyway.
GROUP_ENDERS = ("EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "NOOP", "AUTH")
# How long to wait for input a client sent without waiting for a reply.
PIPELINING_GRACE = 0.02


def split_params(text: str) -> tuple[str, dict[str, str]]:
    """`<addr> KEY=VALUE KEY2` (what follows `MAIL FROM:` / `RCPT TO:`) as
    (address without brackets, {KEY (upper case): value or ""})."""
    text = text.strip()
    if text.startswith("<"):
        end = text.find(">")
        address, rest = text[1:end], text[end + 1:]
    else:
        address, _, rest = text.partition(" ")
    params = {}
    for word in rest.split():
        key, _, value = word.partition("=")
        params[key.upper()] = value
    return address, params


@dataclass
class Transaction:
    """One MAIL command and what followed it."""
    mail_line: str                       # the whole MAIL command line
    sender: str
    mail_params: dict[str, str]
    rcpt_lines: list[str] = field(default_factory=list)   # every RCPT line, refused too
    recipients: list[str] = field(default_factory=list)   # accepted ones
    rcpt_params: list[dict[str, str]] = field(default_factory=list)   # of each RCPT line
    data: bytes | None = None            # after dot-unstuffing, CRLF lines; None: no data
    dot_reply: str | None = None
    tls: bool = False

    @property
    def delivered(self) -> bool:
        """Whether the message was taken (a 2xx to the final dot)."""
        return self.dot_reply is not None and self.dot_reply.startswith("2")


@dataclass
class Connection:
    peer: tuple
    ehlo: str | None = None
    tls: bool = False
    commands: list[str] = field(default_factory=list)   # every command line, in order
    times: list[float] = field(default_factory=list)    # time.monotonic() of each command
    transactions: list[Transaction] = field(default_factory=list)
    quit: bool = False
    # Command lines (and "." for the end of data) that the client followed
    # with more input before their reply, where it had to wait for it.
    unwaited: list[str] = field(default_factory=list)


class _Closed(Exception):
    pass


class ScriptedSMTP:
    def __init__(self, capabilities: tuple[str, ...] | list[str] = DEFAULT_CAPABILITIES,
                 replies: dict[str, Reply] | None = None, hostname: str = "scripted.test",
                 tls: tuple[str, str] | None = None, greeting: str | None = None,
                 address: str = LOCALHOST, port: int = 0, broken_tls: bool = False):
        self.capabilities = list(capabilities)
        self.address = address
        self._bind_port = port
        self.replies: dict[str, Reply] = {**DEFAULT_REPLIES, **(replies or {})}
        self.hostname = hostname
        self.greeting = greeting or f"220 {hostname} ESMTP scripted"
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(*tls)
            if not any(c.upper() == "STARTTLS" for c in self.capabilities):
                self.capabilities.append("STARTTLS")
        # broken_tls: offer STARTTLS, say 220, then send plaintext and
        # hang up, so the client's TLS handshake fails.
        self.broken_tls = broken_tls
        if broken_tls and not any(c.upper() == "STARTTLS" for c in self.capabilities):
            self.capabilities.append("STARTTLS")
        self.connections: list[Connection] = []
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self.port: int | None = None

    # ---- running ---------------------------------------------------------

    def start(self) -> "ScriptedSMTP":
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            listener.bind((self.address, self._bind_port))
        except OSError:
            listener.close()
            raise
        listener.listen(32)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name=f"smtpscript-{self.port}",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Close the listening socket and every client connection; wait
        (briefly) for the threads. Safe to call twice."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> "ScriptedSMTP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what happened ---------------------------------------------------

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self.connections)

    @property
    def transactions(self) -> list[Transaction]:
        """Every transaction (a MAIL accepted) over all connections, in order."""
        with self._lock:
            return [t for c in self.connections for t in c.transactions]

    @property
    def delivered(self) -> list[Transaction]:
        """The transactions whose message was taken (2xx to the dot)."""
        return [t for t in self.transactions if t.delivered]

    @property
    def commands(self) -> list[str]:
        """Every command line over all connections, in order."""
        with self._lock:
            return [line for c in self.connections for line in c.commands]

    def timed_commands(self, verb: str | None = None) -> list[tuple[float, str]]:
        """(time.monotonic(), line) of every command (of `verb` if given)
        over all connections, in time order."""
        with self._lock:
            found = [(t, line) for c in self.connections for t, line in zip(c.times, c.commands)
                     if verb is None or line.split(" ", 1)[0].upper() == verb.upper()]
        return sorted(found)

    @property
    def unwaited(self) -> list[str]:
        """Every command the client did not wait to be answered where it
        had to (see the module's doc), over all connections."""
        with self._lock:
            return [line for c in self.connections for line in c.unwaited]

    def wait_delivered(self, n: int, timeout: float = 20) -> list[Transaction]:
        """Wait until `n` messages were taken; return them."""
        try:
            return wait_until(lambda: len(self.delivered) >= n and self.delivered, timeout,
                              f"{n} message(s) taken by the scripted server on {self.port}")
        except AssertionError as e:
            raise AssertionError(f"{e}; commands seen: {self.commands}") from None

    def wait_connections(self, n: int, timeout: float = 20) -> None:
        wait_until(lambda: self.connection_count >= n, timeout,
                   f"{n} connection(s) to the scripted server on {self.port}")

    # ---- serving ---------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn = Connection(peer)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._socks.add(sock)
                self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(sock, conn), daemon=True,
                                      name=f"smtpscript-{self.port}-client")
            thread.start()
            self._threads.append(thread)

    def _reply_for(self, kind: str, tx: Transaction | None, line: str) -> str:
        script = self.replies[kind]
        with self._lock:
            n = self._counts.get(kind, 0)
            self._counts[kind] = n + 1
        if callable(script):
            return script(tx, line)
        if isinstance(script, (list, tuple)):
            return script[min(n, len(script) - 1)]
        return script

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        session = _Session(self, sock, conn)
        try:
            session.run()
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._socks.discard(session.sock)
                self._socks.discard(sock)
            try:
                session.sock.close()
            except OSError:
                pass


class _Session:
    def __init__(self, server: ScriptedSMTP, sock: socket.socket, conn: Connection):
        self.server = server
        self.sock = sock
        self.conn = conn
        self.buf = b""
        self.tx: Transaction | None = None
        # Whether the current EHLO reply offered PIPELINING.
        self.pipelining = False
        sock.settimeout(IDLE_TIMEOUT)

    def send(self, reply: str) -> None:
        self.sock.sendall(reply.encode("utf-8") + b"\r\n")

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise _Closed("line too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed("client closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def input_waiting(self) -> bool:
        """Whether the client has sent more than we have answered: input
        buffered, or arriving within the grace time."""
        if self.buf:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            ready, _, _ = select.select([self.sock], [], [], PIPELINING_GRACE)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def check_waited(self, line: str, verb: str) -> None:
        """Record `line` in conn.unwaited if the client had to wait for its
        reply and sent more input before it."""
        must_wait = not self.pipelining or verb in GROUP_ENDERS
        if must_wait and self.input_waiting():
            with self.server._lock:
                self.conn.unwaited.append(line)

    def read_data(self) -> bytes:
        lines = []
        while True:
            line = self.read_line()
            if line == b".":
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line + b"\r\n")

    def run(self) -> None:
        server, conn = self.server, self.conn
        self.send(server.greeting)
        if server.greeting.startswith("4"):
            return   # 421: the server closes the connection (RFC 5321 3.8)
        while True:
            raw = self.read_line()
            line = raw.decode("utf-8", "replace")
            with server._lock:
                conn.commands.append(line)
                conn.times.append(time.monotonic())
            verb = line.split(" ", 1)[0].upper()
            if verb not in ("STARTTLS", "QUIT"):
                self.check_waited(line, verb)
            if verb == "EHLO" and "EHLO" in server.replies:
                # A scripted answer to EHLO: a server that only knows HELO.
                self.send(server._reply_for("EHLO", None, line))
            elif verb == "EHLO":
                conn.ehlo = line[5:].strip()
                self.tx = None
                caps = [c for c in server.capabilities
                        if not (conn.tls and c.upper() == "STARTTLS")]
                self.pipelining = any(c.upper() == "PIPELINING" for c in caps)
                lines = [server.hostname, *caps]
                self.send("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}"
                                      for i, text in enumerate(lines)))
            elif verb == "HELO":
                conn.ehlo = line[5:].strip()
                self.tx = None
                self.pipelining = False
                self.send(f"250 {server.hostname}")
            elif verb == "STARTTLS" and server.broken_tls:
                self.send("220 2.0.0 Ready to start TLS")
                self.send("this is not a TLS handshake")
                return
            elif verb == "STARTTLS" and server.tls_context is not None and not conn.tls:
                if self.buf:
                    self.send("554 5.5.1 Error: command pipelined after STARTTLS")
                    return
                self.send("220 2.0.0 Ready to start TLS")
                tls_sock = server.tls_context.wrap_socket(self.sock, server_side=True)
                with server._lock:
                    server._socks.add(tls_sock)
                self.sock = tls_sock
                conn.tls = True
                self.tx = None
            elif verb == "MAIL" and line[4:10].upper() == " FROM:":
                if self.tx is not None:
                    self.send("503 5.5.1 Error: nested MAIL command")
                    continue
                sender, params = split_params(line[10:])
                tx = Transaction(line, sender, params, tls=conn.tls)
                reply = server._reply_for("MAIL", tx, line)
                if reply == DROP:
                    raise _Closed("dropped at MAIL")
                if reply.startswith("2"):
                    self.tx = tx
                    with server._lock:
                        conn.transactions.append(tx)
                self.send(reply)
            elif verb == "RCPT" and line[4:8].upper() == " TO:":
                if self.tx is None:
                    self.send("503 5.5.1 Error: need MAIL command")
                    continue
                address, params = split_params(line[8:])
                reply = server._reply_for("RCPT", self.tx, line)
                if reply == DROP:
                    raise _Closed("dropped at RCPT")
                with server._lock:
                    self.tx.rcpt_lines.append(line)
                    self.tx.rcpt_params.append(params)
                    if reply.startswith("2"):
                        self.tx.recipients.append(address)
                self.send(reply)
            elif verb == "DATA":
                if self.tx is None:
                    self.send("503 5.5.1 Error: need MAIL command")
                    continue
                if not self.tx.recipients:
                    self.send("554 5.5.1 Error: no valid recipients")
                    self.tx = None
                    continue
                reply = server._reply_for("DATA", self.tx, line)
                if reply == DROP:
                    raise _Closed("dropped at DATA")
                if reply == DROP_DURING_DATA:
                    self.send(DEFAULT_REPLIES["DATA"])
                    self.read_line()
                    raise _Closed("dropped during the data")
                self.send(reply)
                if not reply.startswith("3"):
                    self.tx = None
                    continue
                data = self.read_data()
                if not self.pipelining:
                    self.check_waited(".", ".")
                reply = server._reply_for("DOT", self.tx, line)
                if reply == DROP:
                    raise _Closed("dropped after the data")
                with server._lock:
                    self.tx.data = data
                    self.tx.dot_reply = reply
                self.tx = None
                self.send(reply)
            elif verb == "RSET":
                self.tx = None
                self.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                conn.quit = True
                self.send("221 2.0.0 Bye")
                return
            else:
                self.send("502 5.5.2 Error: command not recognized")
