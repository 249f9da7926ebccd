// Reference only: the scratch program behind imap-codec.md (not built by the workspace).
//! Evaluation of imap-codec 2.0.0-alpha.10 / imap-types 2.0.0-alpha.8 for maildird.
//!
//! Part 1: a server-side command reader (Fragmentizer + CommandCodec / AuthenticateDataCodec /
//!         IdleDoneCodec) fed from a scripted client in 5-byte pieces, as from a socket.
//! Part 2: response encoding (FETCH with BODYSTRUCTURE/ENVELOPE/BODY[...] literal/BINARY,
//!         LIST, STATUS, ESEARCH (by hand), response codes), each re-parsed with ResponseCodec.
//! Part 3: probes of command syntax our issue needs (what parses, what does not).

use std::borrow::Cow;
use std::num::NonZeroU32;

use imap_codec::{
    AuthenticateDataCodec, CommandCodec, IdleDoneCodec, ResponseCodec,
    decode::{CommandDecodeError, Decoder},
    encode::{Encoder, Fragment},
    fragmentizer::{DecodeMessageError, FragmentInfo, Fragmentizer, LiteralAnnouncement},
};
use imap_types::{
    IntoStatic,
    auth::{AuthMechanism, AuthenticateData},
    body::{
        BasicFields, Body, BodyStructure, Disposition, Language, Location,
        MultiPartExtensionData, SinglePartExtensionData, SpecificFields,
    },
    command::{Command, CommandBody},
    core::{AString, Atom, IString, Literal, LiteralMode, NString, NString8, QuotedChar, Tag, Vec1},
    envelope::{Address, Envelope},
    extensions::binary::Literal8,
    extensions::enable::CapabilityEnable,
    extensions::namespace::Namespace,
    extensions::utf8::QuotedUtf8,
    extensions::uidplus::{UidElement, UidSet},
    fetch::{MessageDataItem, Section},
    flag::{Flag, FlagFetch, FlagNameAttribute},
    mailbox::Mailbox,
    response::{
        Capability, Code, CodeOther, CommandContinuationRequest, Data, Response, Status,
    },
    status::StatusDataItem,
};

/// Largest literal we accept (sync literals above it are refused before the client sends them).
const MAX_LITERAL: u32 = 64 * 1024;
/// Bound on one whole command (line(s) + literals) kept in memory by the Fragmentizer.
const MAX_COMMAND: u32 = 128 * 1024;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// Show bytes with CR/LF visible.
fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    s.replace('\r', "\\r").replace('\n', "\\n\n")
}

// =================================================================================================
// Part 1: server-side reading of commands
// =================================================================================================

enum State {
    Command,
    /// Waiting for an AUTHENTICATE continuation line (base64 or "*").
    Authenticate(Tag<'static>),
    /// Waiting for "DONE".
    Idle(Tag<'static>),
}

/// What went wrong with a complete message, reduced to what the server answers.
enum Reject {
    /// Syntax error: answer `<tag> BAD` (or `* BAD` when no tag could be read).
    Bad(Option<Tag<'static>>),
    /// Command bigger than MAX_COMMAND, or a literal we refused/poisoned.
    TooBig(Option<Tag<'static>>),
}

struct Session {
    frag: Fragmentizer,
    state: State,
    /// Everything the server has written to the socket.
    out: Vec<u8>,
    /// Tag of a command whose non-sync literal was too big (we read and discard it).
    too_big: Option<Tag<'static>>,
}

impl Session {
    fn new() -> Self {
        Self {
            frag: Fragmentizer::new(MAX_COMMAND),
            state: State::Command,
            out: Vec::new(),
            too_big: None,
        }
    }

    fn write_response(&mut self, rsp: &Response) {
        // Server responses never wait for a continuation, so just dump all fragments.
        let bytes = ResponseCodec::default().encode(rsp).dump();
        print!("S: {}", show(&bytes));
        self.out.extend_from_slice(&bytes);
    }

    /// Bytes arrived from the socket.
    fn feed(&mut self, bytes: &[u8]) {
        self.frag.enqueue_bytes(bytes);

        // `progress()` returns None when it needs more bytes.
        while let Some(fragment) = self.frag.progress() {
            // 1. A line that ends in a literal announcement `{n}` / `{n+}`.
            if let FragmentInfo::Line {
                announcement: Some(LiteralAnnouncement { mode, length }),
                ..
            } = fragment
            {
                let tag = self.frag.decode_tag().map(IntoStatic::into_static);
                match (mode, length <= MAX_LITERAL) {
                    (LiteralMode::Sync, true) => {
                        // The client waits for this before sending the literal bytes.
                        let cont = CommandContinuationRequest::basic(None, "Ready").unwrap();
                        self.write_response(&Response::CommandContinuationRequest(cont));
                    }
                    (LiteralMode::Sync, false) => {
                        // Refuse before a single literal byte is sent: the client will not
                        // send it, so the message ends here.
                        let rsp = Status::no(tag, Some(Code::TooBig), "Literal too big").unwrap();
                        self.write_response(&Response::Status(rsp));
                        self.frag.skip_message();
                    }
                    (LiteralMode::NonSync, true) => { /* LITERAL+: bytes follow at once */ }
                    (LiteralMode::NonSync, false) => {
                        // LITERAL+ (RFC 7888 sec. 4): the bytes come anyway. Keep reading them;
                        // the Fragmentizer stores at most MAX_COMMAND bytes, the rest is
                        // dropped. Answer once the whole command has been consumed.
                        self.too_big = tag;
                        self.frag.poison_message();
                    }
                }
                if !self.frag.is_message_complete() {
                    continue;
                }
            }

            if !self.frag.is_message_complete() {
                continue; // literal data or a line that is followed by more
            }

            // 2. A complete message: decode it according to the state.
            match std::mem::replace(&mut self.state, State::Command) {
                State::Command => self.on_command(),
                State::Authenticate(tag) => self.on_authenticate_data(tag),
                State::Idle(tag) => self.on_idle_done(tag),
            }
        }
    }

    fn decode_command(&mut self) -> Result<Command<'static>, Reject> {
        let tag = || self.frag.decode_tag().map(IntoStatic::into_static);
        match self.frag.decode_message(&CommandCodec::default()) {
            Ok(cmd) => Ok(cmd.into_static()),
            Err(DecodeMessageError::DecodingFailure(CommandDecodeError::Failed)) => {
                Err(Reject::Bad(tag()))
            }
            // Cannot happen for a complete message, but handle it as a syntax error.
            Err(DecodeMessageError::DecodingFailure(
                CommandDecodeError::Incomplete | CommandDecodeError::LiteralFound { .. },
            )) => Err(Reject::Bad(tag())),
            // A command followed by garbage before its CRLF.
            Err(DecodeMessageError::DecodingRemainder { .. }) => Err(Reject::Bad(tag())),
            Err(DecodeMessageError::MessageTooLong { .. }) => Err(Reject::TooBig(tag())),
            Err(DecodeMessageError::MessagePoisoned { .. }) => {
                Err(Reject::TooBig(self.too_big.take().or_else(tag)))
            }
        }
    }

    fn on_command(&mut self) {
        let cmd = match self.decode_command() {
            Ok(cmd) => cmd,
            Err(Reject::Bad(tag)) => {
                let rsp = Status::bad(tag, None, "Syntax error").unwrap();
                return self.write_response(&Response::Status(rsp));
            }
            Err(Reject::TooBig(tag)) => {
                let rsp = Status::no(tag, Some(Code::TooBig), "Command too big").unwrap();
                return self.write_response(&Response::Status(rsp));
            }
        };
        println!("   parsed: {cmd:?}");

        let tag = cmd.tag.clone();
        match cmd.body {
            CommandBody::Login { username, password } => {
                let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                let pass = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                println!("   -> LOGIN user={user:?} pass={pass:?}");
                self.ok(tag, None, "LOGIN completed");
            }
            CommandBody::Select { mailbox, .. } => {
                println!("   -> SELECT {mailbox:?}");
                self.write_response(&Response::Data(Data::Exists(2)));
                self.write_response(&Response::Data(Data::Flags(vec![
                    Flag::Answered, Flag::Flagged, Flag::Deleted, Flag::Seen, Flag::Draft,
                ])));
                let ok = Status::ok(None, Some(Code::uidvalidity(1700000000).unwrap()), "UIDs valid");
                self.write_response(&Response::Status(ok.unwrap()));
                let ok = Status::ok(None, Some(Code::uidnext(3).unwrap()), "Predicted next UID");
                self.write_response(&Response::Status(ok.unwrap()));
                self.ok(tag, Some(Code::ReadWrite), "SELECT completed");
            }
            CommandBody::Fetch { sequence_set, macro_or_item_names, uid, .. } => {
                println!("   -> FETCH uid={uid} set={sequence_set:?} items={macro_or_item_names:?}");
                let items = Vec1::try_from(vec![
                    MessageDataItem::Uid(nz(1)),
                    MessageDataItem::Flags(vec![FlagFetch::Flag(Flag::Seen)]),
                    MessageDataItem::BodyExt {
                        section: Some(Section::HeaderFields(
                            None,
                            Vec1::from(AString::try_from("SUBJECT").unwrap()),
                        )),
                        origin: None,
                        data: NString(Some(IString::Literal(
                            Literal::try_from(&b"Subject: hi\r\n\r\n"[..]).unwrap(),
                        ))),
                    },
                ])
                .unwrap();
                self.write_response(&Response::Data(Data::Fetch { seq: nz(1), items }));
                self.ok(tag, None, "UID FETCH completed");
            }
            CommandBody::Append { mailbox, flags, date, message } => {
                println!("   -> APPEND to {mailbox:?} flags={flags:?} date={date:?} message={message:?}");
                let code = Code::AppendUid { uid_validity: nz(1700000000), uid: nz(3) };
                self.ok(tag, Some(code), "APPEND completed");
            }
            CommandBody::Idle => {
                let cont = CommandContinuationRequest::basic(None, "idling").unwrap();
                self.write_response(&Response::CommandContinuationRequest(cont));
                self.state = State::Idle(tag);
            }
            CommandBody::Authenticate { mechanism, initial_response } => match initial_response {
                // SASL-IR: the initial response is already base64-decoded.
                Some(ir) => {
                    println!("   -> AUTHENTICATE {mechanism} IR={:?}", ir.declassify());
                    self.check_plain(tag, &mechanism, ir.declassify());
                }
                None => {
                    // Empty challenge: "+ " CRLF, then read one AuthenticateData line.
                    let cont = CommandContinuationRequest::base64(&b""[..]);
                    self.write_response(&Response::CommandContinuationRequest(cont));
                    self.state = State::Authenticate(tag);
                }
            },
            _ => self.ok(tag, None, "completed"),
        }
    }

    fn on_authenticate_data(&mut self, tag: Tag<'static>) {
        let result = self
            .frag
            .decode_message(&AuthenticateDataCodec::default())
            .map(IntoStatic::into_static)
            .map_err(|e| format!("{e:?}"));
        match result {
            Ok(AuthenticateData::Continue(data)) => {
                println!("   -> AUTHENTICATE data={:?}", data.declassify());
                self.check_plain(tag, &AuthMechanism::Plain, data.declassify());
            }
            Ok(AuthenticateData::Cancel) => {
                let rsp = Status::bad(Some(tag), None, "AUTHENTICATE cancelled").unwrap();
                self.write_response(&Response::Status(rsp));
            }
            Err(e) => {
                println!("   -> bad authenticate data: {e}");
                let rsp = Status::bad(Some(tag), None, "Invalid base64").unwrap();
                self.write_response(&Response::Status(rsp));
            }
        }
    }

    fn on_idle_done(&mut self, tag: Tag<'static>) {
        let done = self.frag.decode_message(&IdleDoneCodec::default()).is_ok();
        if done {
            self.ok(tag, None, "IDLE terminated");
        } else {
            // Anything but DONE during IDLE: RFC 2177 says the client must send DONE;
            // answer BAD and end the IDLE.
            let rsp = Status::bad(Some(tag), None, "Expected DONE").unwrap();
            self.write_response(&Response::Status(rsp));
        }
    }

    fn check_plain(&mut self, tag: Tag<'static>, mech: &AuthMechanism, data: &[u8]) {
        if *mech != AuthMechanism::Plain {
            let rsp = Status::no(Some(tag), None, "Unsupported mechanism").unwrap();
            return self.write_response(&Response::Status(rsp));
        }
        // PLAIN: authzid \0 authcid \0 password
        let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
        println!(
            "   -> PLAIN authcid={:?} password={:?}",
            String::from_utf8_lossy(parts.get(1).copied().unwrap_or_default()),
            String::from_utf8_lossy(parts.get(2).copied().unwrap_or_default())
        );
        self.ok(tag, None, "AUTHENTICATE completed");
    }

    fn ok(&mut self, tag: Tag<'static>, code: Option<Code<'static>>, text: &'static str) {
        let rsp = Status::ok(Some(tag), code, text).unwrap();
        self.write_response(&Response::Status(rsp));
    }
}

/// One client write; `after_continuation` marks literal data of a synchronizing literal, which a
/// real client only sends after the server's "+".
struct Send {
    bytes: Vec<u8>,
    after_continuation: bool,
}

fn send(bytes: &[u8]) -> Send {
    Send { bytes: bytes.to_vec(), after_continuation: false }
}

fn send_after_plus(bytes: &[u8]) -> Send {
    Send { bytes: bytes.to_vec(), after_continuation: true }
}

fn part1_decode() {
    println!("==================== Part 1: decoding client commands ====================");
    let mut big_nonsync = b"a9 APPEND INBOX {100000+}\r\n".to_vec();
    big_nonsync.extend(std::iter::repeat_n(b'x', 100_000));
    big_nonsync.extend_from_slice(b"\r\n");

    let script = vec![
        send(b"a1 LOGIN {5}\r\n"),
        send_after_plus(b"alice {3}\r\n"),
        send_after_plus(b"pwd\r\n"),
        send(b"a2 SELECT INBOX\r\n"),
        send(b"a3 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"),
        // LITERAL+: no continuation, the bytes follow immediately.
        send(b"a4 APPEND Drafts (\\Seen) {10+}\r\n0123456789\r\n"),
        send(b"a5 IDLE\r\n"),
        send(b"DONE\r\n"),
        // SASL-IR (RFC 4959): "\0alice\0pwd" in base64.
        send(b"a6 AUTHENTICATE PLAIN AGFsaWNlAHB3ZA==\r\n"),
        // Without SASL-IR: "+ " then a base64 line.
        send(b"a7 AUTHENTICATE PLAIN\r\n"),
        send(b"AGFsaWNlAHB3ZA==\r\n"),
        // A sync literal above MAX_LITERAL: refused before the client sends it.
        send(b"a8 APPEND INBOX {99999999}\r\n"),
        // A non-sync literal above MAX_LITERAL: read and discarded, then NO [TOOBIG].
        send(&big_nonsync),
        // Syntax errors -> BAD with the tag when one can be read.
        send(b"b1 FETCH 1:* (FLAGS\r\n"),
        send(b"b2 NOSUCHCOMMAND\r\n"),
        send(b"\r\n"),
        send(b"c1 LOGOUT\r\n"),
    ];

    let mut session = Session::new();
    for step in script {
        if step.after_continuation {
            assert!(session.out.ends_with(b"+ Ready\r\n"), "client must wait for '+'");
        }
        if step.bytes.len() <= 200 {
            print!("C: {}", show(&step.bytes));
        } else {
            println!("C: <{} bytes: {}...>", step.bytes.len(), show(&step.bytes[..30]).trim_end());
        }
        // Deliver in 5-byte pieces, as a socket might.
        for piece in step.bytes.chunks(5) {
            session.feed(piece);
        }
    }
}

// =================================================================================================
// Part 2: encoding responses
// =================================================================================================

fn istr(s: &str) -> IString<'_> {
    IString::try_from(s).unwrap()
}

fn nstr(s: &str) -> NString<'_> {
    NString::try_from(s).unwrap()
}

fn text_part<'a>(subtype: &'a str, size: u32, lines: u32) -> BodyStructure<'a> {
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: vec![(istr("charset"), istr("utf-8"))],
                id: NString(None),
                description: NString(None),
                content_transfer_encoding: istr("quoted-printable"),
                size,
            },
            specific: SpecificFields::Text { subtype: istr(subtype), number_of_lines: lines },
        },
        // BODYSTRUCTURE extension data: md5, disposition, language, location.
        extension_data: Some(SinglePartExtensionData {
            md5: NString(None),
            tail: Some(Disposition {
                disposition: None,
                tail: Some(Language {
                    language: vec![],
                    tail: Some(Location { location: NString(None), extensions: vec![] }),
                }),
            }),
        }),
    }
}

fn encode_and_check(label: &str, rsp: &Response) -> Vec<u8> {
    let encoded = ResponseCodec::default().encode(rsp);
    // Show the fragment structure once (literals are separate fragments).
    let kinds: Vec<String> = encoded
        .clone()
        .map(|f| match f {
            Fragment::Line { data } => format!("Line({}B)", data.len()),
            Fragment::Literal { data, mode } => format!("Literal({}B,{mode:?})", data.len()),
        })
        .collect();
    let bytes = encoded.dump();
    println!("--- {label}  fragments: {}", kinds.join(" "));
    print!("{}", show(&bytes));
    // Round trip: imap-codec can parse what it produced.
    match ResponseCodec::default().decode(&bytes) {
        Ok((rest, back)) => {
            assert!(rest.is_empty());
            if &back == rsp {
                println!("    (re-parsed OK, identical)");
            } else {
                println!("    (re-parsed OK, but the value differs: {back:?})");
            }
        }
        Err(e) => println!("    (re-parse FAILED: {e:?})"),
    }
    bytes
}

fn part2_encode() {
    println!("\n==================== Part 2: encoding responses ====================");

    // CAPABILITY: IMAP4rev2, SPECIAL-USE, ESEARCH, LIST-STATUS, CHILDREN have no typed
    // variant in imap-types 2.0.0-alpha.8; they become Capability::Other via From<Atom>.
    let mut caps = vec![Capability::Imap4Rev1];
    for other in ["IMAP4rev2", "CHILDREN", "SPECIAL-USE", "LIST-STATUS", "ESEARCH"] {
        caps.push(Capability::from(Atom::try_from(other).unwrap()));
    }
    caps.extend([
        Capability::Idle, Capability::UidPlus, Capability::Move, Capability::Namespace,
        Capability::LiteralPlus, Capability::Enable, Capability::Id, Capability::Unselect,
        Capability::SaslIr, Capability::ListExtended, Capability::Binary, Capability::StartTls,
        Capability::Auth(AuthMechanism::Plain),
    ]);
    encode_and_check("CAPABILITY", &Response::Data(Data::capability(caps).unwrap()));

    // FETCH: ENVELOPE (with a group) + BODYSTRUCTURE of multipart/mixed containing
    // multipart/alternative and an attachment, with extension data.
    let alternative = BodyStructure::Multi {
        bodies: Vec1::try_from(vec![text_part("plain", 120, 4), text_part("html", 340, 9)]).unwrap(),
        subtype: istr("alternative"),
        extension_data: Some(MultiPartExtensionData {
            parameter_list: vec![(istr("boundary"), istr("b2"))],
            tail: None,
        }),
    };
    let attachment = BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: vec![(istr("name"), istr("a.pdf"))],
                id: NString(None),
                description: NString(None),
                content_transfer_encoding: istr("base64"),
                size: 4096,
            },
            specific: SpecificFields::Basic { r#type: istr("application"), subtype: istr("pdf") },
        },
        extension_data: Some(SinglePartExtensionData {
            md5: NString(None),
            tail: Some(Disposition {
                disposition: Some((istr("attachment"), vec![(istr("filename"), istr("a.pdf"))])),
                tail: None,
            }),
        }),
    };
    let mixed = BodyStructure::Multi {
        bodies: Vec1::try_from(vec![alternative, attachment]).unwrap(),
        subtype: istr("mixed"),
        extension_data: Some(MultiPartExtensionData {
            parameter_list: vec![(istr("boundary"), istr("b1"))],
            tail: Some(Disposition {
                disposition: None,
                tail: Some(Language {
                    language: vec![istr("en")],
                    tail: Some(Location { location: NString(None), extensions: vec![] }),
                }),
            }),
        }),
    };
    let addr = |name: Option<&'static str>, mbox: Option<&'static str>, host: Option<&'static str>| Address {
        name: NString(name.map(istr)),
        adl: NString(None),
        mailbox: NString(mbox.map(istr)),
        host: NString(host.map(istr)),
    };
    let envelope = Envelope {
        date: nstr("Mon, 7 Feb 1994 21:52:25 -0800"),
        // Encoded words are passed through as-is (servers must not decode them).
        subject: nstr("=?utf-8?q?Gr=C3=BC=C3=9Fe?="),
        from: vec![addr(Some("Alice"), Some("alice"), Some("example.org"))],
        sender: vec![addr(Some("Alice"), Some("alice"), Some("example.org"))],
        reply_to: vec![addr(Some("Alice"), Some("alice"), Some("example.org"))],
        // Group syntax "team: bob@example.org;" -> (NIL NIL "team" NIL) ... (NIL NIL NIL NIL)
        to: vec![
            addr(None, Some("team"), None),
            addr(None, Some("bob"), Some("example.org")),
            addr(None, None, None),
        ],
        cc: vec![],
        bcc: vec![],
        in_reply_to: NString(None),
        message_id: nstr("<1@example.org>"),
    };
    let fetch = Data::Fetch {
        seq: nz(1),
        items: Vec1::try_from(vec![
            MessageDataItem::Uid(nz(42)),
            MessageDataItem::Flags(vec![FlagFetch::Flag(Flag::Seen), FlagFetch::Flag(Flag::Keyword(Atom::try_from("$Forwarded").unwrap()))]),
            MessageDataItem::Rfc822Size(4711),
            MessageDataItem::Envelope(envelope),
            MessageDataItem::BodyStructure(mixed),
        ])
        .unwrap(),
    };
    encode_and_check("FETCH ENVELOPE BODYSTRUCTURE", &Response::Data(fetch));

    // BODY[1.2]<0> partial with a literal body, and BINARY[2] as literal8 (may contain NUL).
    let body_part: &[u8] = b"<html>hi</html>\r\n";
    let fetch = Data::Fetch {
        seq: nz(1),
        items: Vec1::try_from(vec![
            MessageDataItem::Uid(nz(42)),
            MessageDataItem::BodyExt {
                section: Some(Section::Part(imap_types::fetch::Part(
                    Vec1::try_from(vec![nz(1), nz(2)]).unwrap(),
                ))),
                origin: Some(0),
                data: NString(Some(IString::Literal(Literal::try_from(body_part).unwrap()))),
            },
            MessageDataItem::Binary {
                section: vec![nz(2)],
                value: NString8::Literal8(Literal8 {
                    data: Cow::Borrowed(&b"%PDF\x00\x01"[..]),
                    mode: LiteralMode::Sync,
                }),
            },
            MessageDataItem::BinarySize { section: vec![nz(2)], size: 6 },
        ])
        .unwrap(),
    };
    encode_and_check("FETCH BODY[1.2]<0> BINARY[2]", &Response::Data(fetch));

    // LIST with attributes (CHILDREN + SPECIAL-USE attributes are FlagNameAttribute::Extension).
    let attr = |a: &'static str| FlagNameAttribute::from(Atom::try_from(a).unwrap());
    let list = Data::List {
        items: vec![attr("HasNoChildren"), attr("Sent")],
        delimiter: Some(QuotedChar::try_from('/').unwrap()),
        mailbox: Mailbox::try_from("Sent").unwrap(),
    };
    encode_and_check("LIST", &Response::Data(list));
    // A rev1 name is modified UTF-7 bytes we encode ourselves ("Entwürfe").
    let list = Data::List {
        items: vec![attr("HasNoChildren"), attr("Drafts")],
        delimiter: Some(QuotedChar::try_from('/').unwrap()),
        mailbox: Mailbox::try_from("Entw&APw-rfe").unwrap(),
    };
    encode_and_check("LIST (rev1, modified UTF-7 name)", &Response::Data(list));
    // A rev2 name is UTF-8: with ext_utf8 it can be a QuotedUtf8, otherwise it becomes a literal.
    let list = Data::List {
        items: vec![attr("HasNoChildren")],
        delimiter: Some(QuotedChar::try_from('/').unwrap()),
        mailbox: Mailbox::try_from("Entwürfe").unwrap(),
    };
    encode_and_check("LIST (rev2, UTF-8 name, default = literal)", &Response::Data(list));
    // ... or, for a rev2 session, as a quoted UTF-8 string (needs feature ext_utf8).
    let utf8_name = AString::String(IString::QuotedUtf8(QuotedUtf8::try_from("Entwürfe").unwrap()));
    let list = Data::List {
        items: vec![attr("HasNoChildren")],
        delimiter: Some(QuotedChar::try_from('/').unwrap()),
        mailbox: Mailbox::from(utf8_name),
    };
    encode_and_check("LIST (rev2, UTF-8 name as quoted)", &Response::Data(list));

    // ENABLED, NAMESPACE, ID.
    let enabled = Data::Enabled {
        capabilities: vec![CapabilityEnable::from(Atom::try_from("IMAP4rev2").unwrap())],
    };
    encode_and_check("ENABLED", &Response::Data(enabled));
    let ns = Data::Namespace {
        personal: vec![Namespace::new(istr(""), Some(QuotedChar::try_from('/').unwrap()))],
        other: vec![],
        shared: vec![],
    };
    encode_and_check("NAMESPACE", &Response::Data(ns));
    let id = Data::Id { parameters: Some(vec![(istr("name"), nstr("mailsrv"))]) };
    encode_and_check("ID", &Response::Data(id));

    // STATUS (SIZE needs feature ext_status_size; DELETED is always there).
    let status = Data::Status {
        mailbox: Mailbox::Inbox,
        items: Cow::Owned(vec![
            StatusDataItem::Messages(2),
            StatusDataItem::UidNext(nz(3)),
            StatusDataItem::UidValidity(nz(1700000000)),
            StatusDataItem::Unseen(1),
            StatusDataItem::Deleted(0),
            StatusDataItem::Size(9000),
        ]),
    };
    encode_and_check("STATUS", &Response::Data(status));

    // Old-style SEARCH (rev1).
    encode_and_check("SEARCH", &Response::Data(Data::Search(vec![nz(2), nz(5)])));

    // ESEARCH (rev2 / RFC 4731) has no type in imap-types 2.0.0-alpha.8: write it by hand.
    let esearch = format!("* ESEARCH (TAG \"{}\") UID MIN 2 MAX 5 COUNT 2 ALL 2,5\r\n", "a9");
    println!("--- ESEARCH (hand-written)\n{}", show(esearch.as_bytes()));
    println!("    ResponseCodec on it: {:?}", ResponseCodec::default().decode(esearch.as_bytes()).map(|_| ()));

    // Tagged responses with codes.
    let tag = |t: &'static str| Some(Tag::try_from(t).unwrap());
    let rsp = Status::ok(tag("a4"), Some(Code::AppendUid { uid_validity: nz(1700000000), uid: nz(3) }), "APPEND completed");
    encode_and_check("APPENDUID", &Response::Status(rsp.unwrap()));
    let copyuid = Code::CopyUid {
        uid_validity: nz(1700000000),
        source: UidSet(Vec1::try_from(vec![UidElement::Range(nz(1), nz(3)), UidElement::Single(nz(7))]).unwrap()),
        destination: UidSet(Vec1::try_from(vec![UidElement::Range(nz(10), nz(13))]).unwrap()),
    };
    encode_and_check("COPYUID", &Response::Status(Status::ok(tag("a5"), Some(copyuid), "MOVE completed").unwrap()));
    // Codes without a variant (CANNOT, NONEXISTENT, ALREADYEXISTS, ...) via CodeOther.
    let cannot = Code::Other(CodeOther::unvalidated(&b"CANNOT"[..]));
    encode_and_check("CANNOT", &Response::Status(Status::no(tag("a6"), Some(cannot), "Invalid mailbox name").unwrap()));
    encode_and_check("BAD untagged", &Response::Status(Status::bad(None, None, "Syntax error").unwrap()));
    encode_and_check("BYE", &Response::Status(Status::bye(None, "Logging out").unwrap()));

    // Streaming a large body: imap-codec needs the whole literal in memory. Work-around:
    // encode the other items with imap-codec, cut the final ")\r\n", and write
    // " BODY[] {n}\r\n" + the file (streamed) + ")\r\n" ourselves.
    let head = Data::Fetch {
        seq: nz(7),
        items: Vec1::try_from(vec![MessageDataItem::Uid(nz(70)), MessageDataItem::Flags(vec![])]).unwrap(),
    };
    let mut prefix = ResponseCodec::default().encode(&Response::Data(head)).dump();
    assert!(prefix.ends_with(b")\r\n"));
    prefix.truncate(prefix.len() - 3);
    let file_len = 123_456_789u64;
    prefix.extend_from_slice(format!(" BODY[] {{{file_len}}}\r\n").as_bytes());
    println!("--- streamed FETCH prefix\n{}<{file_len} bytes streamed from the file>)\\r\\n", show(&prefix));
}

// =================================================================================================
// Part 3: which command forms parse
// =================================================================================================

fn part3_probe() {
    println!("\n==================== Part 3: command syntax probes ====================");
    let probes: &[&[u8]] = &[
        b"t ENABLE IMAP4rev2\r\n",
        b"t ENABLE UTF8=ACCEPT\r\n",
        b"t CAPABILITY\r\n",
        b"t ID (\"name\" \"mutt\" \"version\" \"2.2\")\r\n",
        b"t ID NIL\r\n",
        b"t NAMESPACE\r\n",
        b"t UNSELECT\r\n",
        b"t UID EXPUNGE 1:3,5\r\n",
        b"t MOVE 1:* Trash\r\n",
        b"t UID MOVE 1 Trash\r\n",
        b"t UID COPY 1:2 Archive\r\n",
        b"t STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE RECENT)\r\n",
        b"t LIST \"\" *\r\n",
        b"t LIST \"\" \"*\" RETURN (SPECIAL-USE)\r\n",
        b"t LIST (SPECIAL-USE) \"\" \"*\"\r\n",
        b"t LIST (SUBSCRIBED) \"\" \"*\" RETURN (CHILDREN STATUS (MESSAGES UNSEEN))\r\n",
        b"t LIST \"\" (INBOX Sent)\r\n",
        b"t LSUB \"\" *\r\n",
        b"t SELECT \"Entw&APw-rfe\"\r\n",
        "t SELECT \"Entwürfe\"\r\n".as_bytes(),
        b"t SELECT INBOX (CONDSTORE)\r\n",
        b"t SEARCH CHARSET UTF-8 OR (FROM alice NOT SEEN) UID 1:* SUBJECT \"x\"\r\n",
        b"t UID SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN\r\n",
        b"t SEARCH RETURN () ALL\r\n",
        b"t SEARCH NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT NOT SEEN\r\n",
        b"t FETCH 1 (BINARY.PEEK[1]<0.100> BINARY.SIZE[1])\r\n",
        b"t FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)\r\n",
        b"t FETCH 1 (BODY[1.2.MIME] BODY[HEADER.FIELDS.NOT (Received)] BODY[TEXT]<0.512>)\r\n",
        b"t FETCH 1 FULL\r\n",
        b"t UID STORE 1:* +FLAGS.SILENT (\\Deleted $Junk)\r\n",
        b"t APPEND INBOX (\\Seen) \" 1-Jan-2024 10:00:00 +0000\" ~{3+}\r\na\x00c\r\n",
        b"t AUTHENTICATE PLAIN =\r\n",
        b"t STARTTLS\r\n",
        b"t CREATE Work/Projects\r\n",
        b"t CREATE Foo (USE (\\Sent))\r\n",
        b"t SELECT INBOX extra\r\n",
        b"t LOGIN alice pa\"ss\r\n",
    ];
    for input in probes {
        let line = String::from_utf8_lossy(input);
        let line = if line.len() > 70 { format!("{}...", &line[..70]) } else { line.trim_end().to_string() };
        match CommandCodec::default().decode(input) {
            Ok((rest, cmd)) if rest.is_empty() => {
                let dbg = format!("{:?}", cmd.body);
                let dbg = if dbg.len() > 150 { format!("{}...", &dbg[..150]) } else { dbg };
                println!("OK    {line}\n      {dbg}");
            }
            Ok((rest, _)) => println!("REST  {line}  remainder={:?}", String::from_utf8_lossy(rest)),
            Err(e) => println!("ERR   {line}  -> {e:?}"),
        }
    }
}

/// How deep may SEARCH keys nest before the parser gives up?
fn part3_depth() {
    for n in 1..20 {
        // "OR OR OR ... SEEN SEEN ..." (left-nested, as clients build long OR lists)
        let cmd = format!("t UID SEARCH {}SEEN{}\r\n", "OR ".repeat(n), " SEEN".repeat(n));
        let or_ok = CommandCodec::default().decode(cmd.as_bytes()).is_ok();
        let cmd = format!("t SEARCH {}SEEN{}\r\n", "(".repeat(n), ")".repeat(n));
        let paren_ok = CommandCodec::default().decode(cmd.as_bytes()).is_ok();
        println!("nesting {n:2}: OR-chain {}  parentheses {}", or_ok, paren_ok);
    }
}

fn main() {
    part1_decode();
    part2_encode();
    part3_probe();
    part3_depth();
}
