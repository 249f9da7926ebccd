//! sendmail (and mailq): the command every Unix program expects. It
//! writes the message to the spool's maildrop (common::maildrop), so mail
//! is queued even while the daemons are down; qmgr picks it up. See
//! sendmail(1).

use std::io::{BufRead, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

mod smtp_stdin;

use common::address::Address;
use common::config::Config;
use common::maildrop::{self, DropEnvelope};
use common::queue_id::new_queue_id;
use common::spool::QueueState;
use mailsrv_mta::smtp::session::{Port, Session, SessionLimits, Transaction};

/// sysexits.h
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_SOFTWARE: u8 = 70;
const EX_CANTCREAT: u8 = 73;
const EX_TEMPFAIL: u8 = 75;
const EX_NOPERM: u8 = 77;
const EX_CONFIG: u8 = 78;

/// Longest header block read for `-t` and for the headers we add.
const MAX_HEADER: usize = 1 << 20;

/// A failure: the exit code and what to say.
struct Failure(u8, String);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("sendmail: {message}");
            ExitCode::from(code)
        }
    }
}

/// What to do.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    config: Option<PathBuf>,
    /// -t: take recipients from To, Cc and Bcc too.
    from_headers: bool,
    /// -i / -oi: a line with a single dot does not end the message.
    ignore_dots: bool,
    /// -f: the envelope sender.
    sender: Option<String>,
    /// -F: the full name for a From: we add.
    full_name: Option<String>,
    mode: Mode,
    recipients: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Mode {
    #[default]
    Deliver,
    /// -bp, or called as mailq.
    ListQueue,
    /// -q: retry the queue now.
    Flush,
    /// -bs: SMTP on standard input and output.
    Smtp,
}

fn parse_args(args: &[String]) -> Result<Options, Failure> {
    let usage = |m: String| Failure(EX_USAGE, m);
    let mut o = Options::default();
    let called = args.first().map(String::as_str).unwrap_or("sendmail");
    if called.rsplit('/').next() == Some("mailq") {
        o.mode = Mode::ListQueue;
    }
    let mut rest = args.iter().skip(1);
    // An option's value: the rest of the word (-fADDR) or the next one.
    let value = |inline: &str, rest: &mut dyn Iterator<Item = &String>, flag: &str| {
        if inline.is_empty() {
            rest.next()
                .cloned()
                .ok_or_else(|| usage(format!("-{flag} needs a value")))
        } else {
            Ok(inline.to_string())
        }
    };
    while let Some(arg) = rest.next() {
        if arg == "--" {
            o.recipients.extend(rest.cloned());
            break;
        }
        let Some(flag) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            o.recipients.push(arg.clone());
            continue;
        };
        match flag {
            "t" => o.from_headers = true,
            "i" | "oi" => o.ignore_dots = true,
            "bp" => o.mode = Mode::ListQueue,
            "bm" => o.mode = Mode::Deliver,
            "q" => o.mode = Mode::Flush,
            "bs" => o.mode = Mode::Smtp,
            // Error reporting, delivery mode, verbosity and other -o
            // options change nothing here (Postfix ignores them too).
            f if f.starts_with('o') || f.starts_with('d') || f == "v" || f == "n" => {}
            // -B8BITMIME (Debian's cron gives it): the body type is found
            // by looking at the message, not declared.
            f if f.starts_with('B') => {
                value(&f[1..], &mut rest, "B")?;
            }
            f if f.starts_with('f') || f.starts_with('r') => {
                o.sender = Some(value(&f[1..], &mut rest, &f[..1])?);
            }
            f if f.starts_with('F') => o.full_name = Some(value(&f[1..], &mut rest, "F")?),
            f if f.starts_with('C') => o.config = Some(value(&f[1..], &mut rest, "C")?.into()),
            f if f.starts_with('q') => o.mode = Mode::Flush,
            _ => return Err(usage(format!("unknown option {arg}"))),
        }
    }
    Ok(o)
}

fn run(args: &[String]) -> Result<(), Failure> {
    let options = parse_args(args)?;
    let config_path = Config::locate(options.config.as_deref());
    trusted_config(&config_path)?;
    let config = Config::load(&config_path).map_err(|e| Failure(EX_CONFIG, e.to_string()))?;
    match options.mode {
        Mode::ListQueue => mailctl(&config, &config_path, &["queue", "list"]),
        Mode::Flush => mailctl(&config, &config_path, &["queue", "flush"]),
        Mode::Deliver => deliver(&config, options),
        Mode::Smtp => smtp_session(&config),
    }
}

/// Installed setgid to the maildrop group, sendmail may write into the
/// maildrop for any user; a config that user wrote could aim that write
/// elsewhere, so (like Postfix's postdrop with alternate configs) only a
/// config that root owns and only root can change is read then.
fn trusted_config(path: &std::path::Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    let setgid = nix::unistd::getegid() != nix::unistd::getgid();
    if !setgid || nix::unistd::getuid().is_root() {
        return Ok(());
    }
    let refuse = |why: &str| {
        Failure(
            EX_NOPERM,
            format!(
                "{}: {why}; refusing it in a setgid sendmail",
                path.display()
            ),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| refuse(&e.to_string()))?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(refuse("not owned by root, or writable by others than root"));
    }
    Ok(())
}

/// Hand over to mailctl for the queue commands.
fn mailctl(config: &Config, config_path: &std::path::Path, args: &[&str]) -> Result<(), Failure> {
    // mailctl has no use for the maildrop group of a setgid sendmail.
    let gid = nix::unistd::getgid();
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|e| Failure(EX_SOFTWARE, format!("giving up the setgid group: {e}")))?;
    let dir = config
        .paths
        .binary_dir()
        .map_err(|e| Failure(EX_SOFTWARE, format!("finding mailctl: {e}")))?;
    let program = dir.join("mailctl");
    let err = std::process::Command::new(&program)
        .arg("-c")
        .arg(config_path)
        .args(args)
        .exec();
    Err(Failure(
        EX_SOFTWARE,
        format!("{}: {err}", program.display()),
    ))
}

/// The calling user's login name and full name (GECOS), and uid.
fn caller() -> (String, String, u32) {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => {
            let gecos = u.gecos.to_string_lossy();
            let full = gecos.split(',').next().unwrap_or_default().to_string();
            (u.name, full, uid.as_raw())
        }
        _ => (format!("uid{}", uid.as_raw()), String::new(), uid.as_raw()),
    }
}

fn deliver(config: &Config, options: Options) -> Result<(), Failure> {
    let (login, gecos, uid) = caller();
    let own_address = format!("{login}@{}", config.hostname);
    let sender = match options.sender.as_deref() {
        Some("<>") | Some("") => String::new(),
        Some(s) => s.trim_matches(['<', '>']).to_string(),
        None => own_address.clone(),
    };
    if !sender.is_empty() {
        Address::parse(&sender)
            .map_err(|e| Failure(EX_DATAERR, format!("sender <{sender}>: {e}")))?;
    }
    let mut stdin = std::io::stdin().lock();
    let header = read_header(&mut stdin, options.ignore_dots)?;
    let mut recipients = options.recipients.clone();
    if options.from_headers {
        recipients.extend(header_recipients(&header.bytes));
    }
    let ended = header.ended;
    let body_start = header.body_start;
    let recipients = checked_recipients(recipients, &config.hostname)?;
    let full_name = options.full_name.clone().unwrap_or(gecos);
    let added = added_headers(&header.bytes, config, &own_address, &full_name);
    let id = new_queue_id();
    let envelope = DropEnvelope {
        sender,
        recipients,
        user: login,
        uid,
    };
    let mut body = Body {
        input: stdin,
        ignore_dots: options.ignore_dots,
        ended,
        written: 0,
        limit: config.smtpd.max_message_size,
        at_line_start: true,
    };
    let header = without_bcc(&header.bytes);
    // The limit is on the whole message, as smtpd's.
    body.written = (added.len() + header.len() + body_start.len()) as u64;
    let mut message = added
        .as_bytes()
        .chain(&header[..])
        .chain(&body_start[..])
        .chain(&mut body);
    let dir = common::spool::Spool::new(&config.paths.spool).dir(QueueState::Maildrop);
    match maildrop::write(&dir, &id, &envelope, &mut message) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => Err(Failure(
            EX_DATAERR,
            format!(
                "message larger than {} bytes (smtpd.max_message_size)",
                config.smtpd.max_message_size
            ),
        )),
        Err(e) => Err(write_failure(&dir, e)),
    }
}

/// `-bs`: take messages over SMTP on standard input (RFC 5321 over a
/// pipe), each written to the maildrop like a command-line message.
fn smtp_session(config: &Config) -> Result<(), Failure> {
    let (login, _, uid) = caller();
    let dir = common::spool::Spool::new(&config.paths.spool).dir(QueueState::Maildrop);
    let mut store = |tx: &Transaction, message: &mut dyn Read| {
        let id = new_queue_id();
        let envelope = DropEnvelope {
            sender: tx.sender.clone(),
            recipients: tx.recipients.iter().map(|r| r.address.clone()).collect(),
            user: login.clone(),
            uid,
        };
        maildrop::write(&dir, &id, &envelope, &mut ReadRef(message)).map(|_| id)
    };
    let session = Session::new(
        SessionLimits::new(config),
        Port::Local,
        std::net::Ipv4Addr::LOCALHOST.into(),
        None,
    );
    smtp_stdin::serve(
        session,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        config.smtpd.max_line_length,
        config.smtpd.max_message_size,
        &mut store,
    )
    .map_err(|e| Failure(EX_SOFTWARE, format!("-bs session: {e}")))
}

/// A `&mut dyn Read` as a sized reader.
struct ReadRef<'a>(&'a mut dyn Read);

impl Read for ReadRef<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

fn write_failure(dir: &std::path::Path, e: std::io::Error) -> Failure {
    let code = if common::spool::is_disk_full(&e) {
        EX_TEMPFAIL
    } else if e.kind() == std::io::ErrorKind::PermissionDenied {
        EX_NOPERM
    } else {
        EX_CANTCREAT
    };
    Failure(
        code,
        format!("cannot queue the message in {}: {e}", dir.display()),
    )
}

/// The header block as read from standard input.
struct Header {
    /// The header fields, and the empty line after them if there was one.
    bytes: Vec<u8>,
    /// A first line that was not a header field: the body starts with it,
    /// after the empty line added in front of it.
    body_start: Vec<u8>,
    /// The input ended inside it (or at its single-dot line).
    ended: bool,
}

/// Read the header block: lines up to and including the empty line.
fn read_header(input: &mut impl BufRead, ignore_dots: bool) -> Result<Header, Failure> {
    let mut bytes = Vec::new();
    loop {
        let start = bytes.len();
        let n = input
            .read_until(b'\n', &mut bytes)
            .map_err(|e| Failure(EX_DATAERR, format!("reading the message: {e}")))?;
        let line = &bytes[start..];
        if n == 0 {
            return Ok(Header {
                bytes,
                body_start: Vec::new(),
                ended: true,
            });
        }
        if !ignore_dots && is_dot_line(line) {
            bytes.truncate(start);
            return Ok(Header {
                bytes,
                body_start: Vec::new(),
                ended: true,
            });
        }
        if line == b"\n" || line == b"\r\n" {
            return Ok(Header {
                bytes,
                body_start: Vec::new(),
                ended: false,
            });
        }
        // A line that is not a header field (RFC 5322 2.2) starts the body.
        let is_field = line[0] == b' '
            || line[0] == b'\t'
            || line
                .iter()
                .take_while(|b| **b != b':')
                .all(|b| b.is_ascii_graphic())
                && line.contains(&b':');
        if !is_field {
            let mut body_start = b"\n".to_vec();
            body_start.extend_from_slice(&bytes[start..]);
            bytes.truncate(start);
            return Ok(Header {
                bytes,
                body_start,
                ended: false,
            });
        }
        if bytes.len() > MAX_HEADER {
            return Err(Failure(EX_DATAERR, "header longer than 1 MiB".into()));
        }
    }
}

fn is_dot_line(line: &[u8]) -> bool {
    line == b".\n" || line == b".\r\n" || line == b"."
}

/// The addresses of To, Cc and Bcc (and their Resent- forms).
fn header_recipients(header: &[u8]) -> Vec<String> {
    let Some(message) = mail_parser::MessageParser::default().parse_headers(header) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for field in message.headers() {
        let name = field.name();
        let wanted = ["to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"];
        if !wanted.iter().any(|w| name.eq_ignore_ascii_case(w)) {
            continue;
        }
        if let Some(list) = field.value().as_address() {
            out.extend(list.iter().filter_map(|a| a.address()).map(str::to_string));
        }
    }
    out
}

/// The recipients, checked; a bare name (`root`, as cron gives it) is
/// qualified with `hostname`, as Postfix appends $myorigin.
fn checked_recipients(recipients: Vec<String>, hostname: &str) -> Result<Vec<String>, Failure> {
    let mut out: Vec<String> = Vec::new();
    for r in recipients {
        // Several addresses in one argument, as some programs pass them.
        for one in r.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let one = one.trim_matches(['<', '>']);
            let qualified;
            let one = if one.contains('@') {
                one
            } else {
                qualified = format!("{one}@{hostname}");
                &qualified
            };
            let address = Address::parse(one)
                .map_err(|e| Failure(EX_DATAERR, format!("recipient <{one}>: {e}")))?;
            if !out
                .iter()
                .any(|x| x.eq_ignore_ascii_case(&address.to_string()))
            {
                out.push(address.to_string());
            }
        }
    }
    if out.is_empty() {
        return Err(Failure(
            EX_USAGE,
            "no recipients given (name them, or use -t)".into(),
        ));
    }
    Ok(out)
}

/// Date, Message-ID and From, each when the message lacks it (RFC 5322
/// 3.6 requires Date and From).
fn added_headers(header: &[u8], config: &Config, own: &str, full_name: &str) -> String {
    let has = |name: &str| {
        header.split(|b| *b == b'\n').any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':'
        })
    };
    let mut out = String::new();
    if !has("Date") {
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        out.push_str(&format!("Date: {date}\n"));
    }
    if !has("Message-ID") {
        out.push_str(&format!(
            "Message-ID: <{}@{}>\n",
            new_queue_id(),
            config.hostname
        ));
    }
    if !has("From") {
        if full_name.is_empty() {
            out.push_str(&format!("From: {own}\n"));
        } else {
            // The name goes into a header: no line ends, no control
            // characters (RFC 5322 3.2.4 qcontent), no quote or backslash.
            let quoted: String = full_name
                .chars()
                .filter(|c| !c.is_control() && !matches!(c, '\\' | '"'))
                .collect();
            out.push_str(&format!("From: \"{quoted}\" <{own}>\n"));
        }
    }
    out
}

/// The header block without its Bcc field (RFC 5322 3.6.3: the blind
/// recipients must not see each other).
fn without_bcc(header: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len());
    let mut skipping = false;
    for line in header.split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            let starts = |p: &[u8]| line.len() > p.len() && line[..p.len()].eq_ignore_ascii_case(p);
            skipping = starts(b"bcc:") || starts(b"resent-bcc:");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out
}

/// The rest of standard input after the header: up to EOF, or the
/// single-dot line unless -i; at most `limit` bytes in all.
struct Body<R> {
    input: R,
    ignore_dots: bool,
    ended: bool,
    written: u64,
    limit: u64,
    /// Whether the next byte starts a line (a long line comes in pieces;
    /// only a whole line can be the single dot).
    at_line_start: bool,
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        let mut line = Vec::new();
        // One line at a time, so a single-dot line is seen whole.
        let n = (&mut self.input)
            .take(buf.len() as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 || (!self.ignore_dots && self.at_line_start && is_dot_line(&line)) {
            self.ended = true;
            return Ok(0);
        }
        self.at_line_start = line.ends_with(b"\n");
        self.written += n as u64;
        if self.written > self.limit {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        buf[..n].copy_from_slice(&line);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn options_as_programs_give_them() {
        let o = parse_args(&args("sendmail -t -oi -f me@x.test -FJoe a@b.test"))
            .ok()
            .unwrap();
        assert!(o.from_headers && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("me@x.test"));
        assert_eq!(o.full_name.as_deref(), Some("Joe"));
        assert_eq!(o.recipients, ["a@b.test"]);
        let o = parse_args(&args("/usr/bin/mailq")).ok().unwrap();
        assert_eq!(o.mode, Mode::ListQueue);
        let o = parse_args(&args("sendmail -oem -odb -i -Cfile -- -x@y.test"))
            .ok()
            .unwrap();
        assert_eq!(o.config, Some(PathBuf::from("file")));
        assert_eq!(o.recipients, ["-x@y.test"]);
        assert!(parse_args(&args("sendmail -Z")).is_err());
        assert!(parse_args(&args("sendmail -f")).is_err());
    }

    #[test]
    fn header_reading_stops_at_blank_line_or_dot() {
        let mut input = &b"To: a@b.test\nSubject: x\n\nbody\n.\nafter\n"[..];
        let h = read_header(&mut input, false).ok().unwrap();
        assert_eq!(h.bytes, b"To: a@b.test\nSubject: x\n\n");
        assert!(!h.ended);
        let mut body = Body {
            input: &mut input,
            ignore_dots: false,
            ended: false,
            written: 0,
            limit: 100,
            at_line_start: true,
        };
        let mut rest = Vec::new();
        body.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"body\n");
        let mut no_header = &b"just text\nmore\n"[..];
        let h = read_header(&mut no_header, false).ok().unwrap();
        assert!(h.bytes.is_empty());
        assert_eq!(h.body_start, b"\njust text\n");
        let mut dotted = &b"Subject: y\n.\n"[..];
        let h = read_header(&mut dotted, false).ok().unwrap();
        assert!(h.ended);
        assert_eq!(h.bytes, b"Subject: y\n");
    }

    #[test]
    fn recipients_from_headers_and_bcc_removed() {
        let header = b"To: A <a@b.test>, c@d.test\nCc: e@f.test\nBcc: hidden@g.test,\n more@g.test\nSubject: s\n\n";
        let got = header_recipients(header);
        assert_eq!(
            got,
            [
                "a@b.test",
                "c@d.test",
                "e@f.test",
                "hidden@g.test",
                "more@g.test"
            ]
        );
        let kept = String::from_utf8(without_bcc(header)).unwrap();
        assert_eq!(
            kept,
            "To: A <a@b.test>, c@d.test\nCc: e@f.test\nSubject: s\n\n"
        );
        assert!(checked_recipients(vec![], "h.test").is_err());
        assert_eq!(
            checked_recipients(vec!["a@b.test, A@B.test".into(), "root".into()], "h.test")
                .ok()
                .unwrap(),
            ["a@b.test", "root@h.test"]
        );
        let resent = without_bcc(b"Resent-Bcc: x@y.test\nSubject: s\n");
        assert_eq!(resent, b"Subject: s\n");
    }
}
