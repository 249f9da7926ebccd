//! The IMAP session state machine (RFC 9051 3): one decoded command in,
//! responses out. File work happens here, network I/O and logins in
//! [`super::server`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::flags::{MessageFlags, SystemFlag};
use imap_types::command::CommandBody;
use imap_types::extensions::enable::CapabilityEnable;
use imap_types::fetch::{Macro, MacroOrMessageDataItemNames, MessageDataItemName};
use imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_types::mailbox::Mailbox;
use imap_types::search::SearchKey;
use imap_types::sequence::SequenceSet;
use imap_types::status::StatusDataItemName;

use super::cache::FolderCache;
use super::command::Request;
use super::fetch::{self, FetchError, FetchMode};
use super::folder::{self, Changes, Folder};
use super::mailboxes::{self, MailboxError, Mailboxes, StatusInfo};
use super::output::Output;
use super::search::{self, Candidate};
use super::sequence::{compact, NumberSet};
use super::syntax::{self, ListCommand, SearchReturn};
use super::wire;
use crate::login::LoginPolicy;
use common::mailbox_name::{decode_mutf7, MailboxName, DELIMITER};

/// Capabilities once logged in (RFC 9051 7.2.2).
const CAPABILITIES: &str = "IMAP4rev1 IMAP4rev2 IDLE UIDPLUS MOVE SPECIAL-USE NAMESPACE \
LITERAL+ ENABLE ID UNSELECT CHILDREN SASL-IR LIST-EXTENDED LIST-STATUS ESEARCH SEARCHRES BINARY \
UTF8=ACCEPT QUOTA QUOTA=RES-STORAGE";

/// What the I/O loop must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the output; read the next command.
    Continue,
    /// Check these credentials, then call [`Session::logged_in`] or
    /// [`Session::login_failed`].
    Login {
        tag: String,
        user: String,
        password: String,
    },
    /// Send `+ `, read one line, pass it to [`Session::sasl_response`].
    SaslContinue { tag: String },
    /// Send the output, then start TLS.
    StartTls,
    /// Send the output, then call [`Session::resume`] (a long FETCH).
    Resume,
    /// Send `+ idling`, wait for DONE ([`Session::idle_done`]) while
    /// passing folder changes through [`Session::updates`].
    Idle { tag: String },
    /// Send the output and close.
    Close,
}

/// An IMAP session.
/// A FETCH under way (see [`Session::resume`]).
struct PendingFetch {
    tag: String,
    indexes: Vec<usize>,
    next: usize,
    items: Vec<MessageDataItemName<'static>>,
    uid: bool,
    missing: bool,
    seen_changed: bool,
}

/// Output held in memory before a FETCH stops to let it be sent.
const FETCH_CHUNK: usize = 256 * 1024;

/// A UID and sequence number no message has (RFC 9051: at most 2^32-1).
const NO_MESSAGE: u32 = u32::MAX;

pub struct Session {
    policy: LoginPolicy,
    pending_fetch: Option<PendingFetch>,
    /// The saved SEARCH result (RFC 5182), as UIDs, ascending.
    saved: Vec<u32>,
    /// `$` in this command stood for no message.
    saved_empty: bool,
    /// A BYE went out: close after this command.
    closing: bool,
    cache: std::sync::Arc<FolderCache>,
    tls: bool,
    user: Option<String>,
    /// The user's storage limit in bytes, if any: one quota root, "".
    quota: Option<u64>,
    mailboxes: Option<Mailboxes>,
    selected: Option<Folder>,
    rev2: bool,
    utf8: bool,
    /// Responses not yet sent.
    pub out: Output,
}

/// Result of one command's own work: the tagged completion.
struct Done {
    status: &'static str,
    code: Option<String>,
    text: String,
}

impl Done {
    fn ok(text: impl Into<String>) -> Done {
        Done {
            status: "OK",
            code: None,
            text: text.into(),
        }
    }
    fn ok_code(code: impl Into<String>, text: impl Into<String>) -> Done {
        Done {
            status: "OK",
            code: Some(code.into()),
            text: text.into(),
        }
    }
    fn no(code: Option<&str>, text: impl Into<String>) -> Done {
        Done {
            status: "NO",
            code: code.map(str::to_string),
            text: text.into(),
        }
    }
    fn bad(text: impl Into<String>) -> Done {
        Done {
            status: "BAD",
            code: None,
            text: text.into(),
        }
    }
}

impl From<MailboxError> for Done {
    fn from(e: MailboxError) -> Done {
        match e {
            MailboxError::NonExistent => Done::no(Some("NONEXISTENT"), e.to_string()),
            MailboxError::AlreadyExists => Done::no(Some("ALREADYEXISTS"), e.to_string()),
            MailboxError::Cannot(t) => Done::no(Some("CANNOT"), t),
            MailboxError::Io(e) => server_error(e),
        }
    }
}

fn server_error(e: impl std::fmt::Display) -> Done {
    tracing::error!("imap: {e}");
    Done::no(Some("SERVERBUG"), "Internal error; see the server log")
}

impl From<common::flags::FlagsError> for Done {
    fn from(e: common::flags::FlagsError) -> Done {
        match e {
            common::flags::FlagsError::TooManyKeywords => Done::no(Some("LIMIT"), e.to_string()),
            common::flags::FlagsError::Io(e) => server_error(e),
        }
    }
}

impl Session {
    /// A new session; `tls` when the connection is already encrypted.
    pub fn new(policy: LoginPolicy, tls: bool, cache: std::sync::Arc<FolderCache>) -> Session {
        Session {
            policy,
            pending_fetch: None,
            saved: Vec::new(),
            saved_empty: false,
            closing: false,
            cache,
            tls,
            user: None,
            quota: None,
            mailboxes: None,
            selected: None,
            rev2: false,
            utf8: false,
            out: Output::default(),
        }
    }

    /// The greeting (RFC 9051 7.1.1).
    pub fn greet(&mut self) {
        let caps = self.capabilities();
        self.out.line(&format!(
            "* OK [CAPABILITY {caps}] {} IMAP ready",
            self.policy.hostname
        ));
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The selected folder's directory, for change notification.
    pub fn selected_path(&self) -> Option<&Path> {
        self.selected.as_ref().map(|f| f.path.as_path())
    }

    /// Where a streamed APPEND literal may be written before the command
    /// is decoded: the user's Maildir `tmp/`. APPEND then stores it in
    /// the target folder with LF line ends and removes it.
    pub fn append_spool(&self) -> Option<PathBuf> {
        self.mailboxes.as_ref().map(|m| m.root().join("tmp"))
    }

    /// TLS is now up (after STARTTLS).
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    fn login_allowed(&self) -> bool {
        self.tls || self.policy.allow_plaintext_auth
    }

    fn capabilities(&self) -> String {
        if self.user.is_some() {
            return CAPABILITIES.to_string();
        }
        let mut caps = "IMAP4rev1 IMAP4rev2 SASL-IR LITERAL+ ID ENABLE IDLE".to_string();
        if !self.tls && self.policy.tls_available {
            caps.push_str(" STARTTLS");
        }
        // RFC 9051 6.2.3, 7.2.2: LOGINDISABLED when LOGIN would be refused.
        caps.push_str(if self.login_allowed() {
            " AUTH=PLAIN"
        } else {
            " LOGINDISABLED"
        });
        caps
    }

    fn finish(&mut self, tag: &str, done: Done) {
        let code = done.code.map(|c| format!("[{c}] ")).unwrap_or_default();
        self.out
            .line(&format!("{tag} {} {code}{}", done.status, done.text));
    }

    fn fetch_mode(&self) -> FetchMode {
        FetchMode {
            utf8: self.utf8,
            rev2: self.rev2,
        }
    }

    /// Handle one command. `appended` is the file holding an APPEND
    /// message literal that the reader streamed to disk.
    pub fn handle(&mut self, request: Request, appended: Option<PathBuf>) -> Action {
        let (tag, body) = match request {
            Request::Bad { tag, text } => {
                let tag = tag.unwrap_or_else(|| "*".into());
                self.out.line(&format!("{tag} BAD {text}"));
                return Action::Continue;
            }
            Request::List {
                tag,
                mut list,
                lsub,
            } => {
                list.select_subscribed |= lsub;
                let done = self
                    .authenticated()
                    .and_then(|()| self.list_or_lsub(&list, lsub));
                self.complete(&tag, done, true);
                return self.next_action();
            }
            Request::Search {
                tag,
                uid,
                ret,
                charset,
                criteria,
            } => {
                self.updates(false);
                let saving = ret.as_ref().is_some_and(|r| r.save);
                let done = self
                    .in_selected()
                    .and_then(|()| self.search(&tag, uid, ret, charset, &criteria));
                if saving && done.is_err() {
                    // RFC 5182 2.1: a failed SEARCH ... SAVE saves nothing.
                    self.saved.clear();
                }
                self.complete(&tag, done, uid);
                return self.next_action();
            }
            Request::Imap { tag, body } => (tag, body),
        };
        // Work on the folder as it is now: another session may have renamed
        // or removed files since the last command (EXPUNGEs still wait).
        self.updates(false);
        let _folders = match body {
            CommandBody::Copy { .. }
            | CommandBody::Move { .. }
            | CommandBody::Expunge
            | CommandBody::ExpungeUid { .. }
            | CommandBody::Close
            | CommandBody::Delete { .. }
            | CommandBody::Rename { .. } => self.lock_folders(),
            _ => None,
        };
        let uid_or_other = !matches!(
            body,
            CommandBody::Fetch { uid: false, .. }
                | CommandBody::Store { uid: false, .. }
                | CommandBody::Copy { uid: false, .. }
        );
        let done = match body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.out.line(&format!("* CAPABILITY {caps}"));
                Ok(Done::ok("CAPABILITY completed"))
            }
            CommandBody::Noop => Ok(Done::ok("NOOP completed")),
            CommandBody::Logout => {
                self.out.line("* BYE Logging out");
                self.finish(&tag, Done::ok("LOGOUT completed"));
                return Action::Close;
            }
            CommandBody::StartTLS => {
                if self.tls || !self.policy.tls_available {
                    Err(Done::bad("TLS is already active or not available"))
                } else if self.user.is_some() {
                    Err(Done::bad("Already logged in"))
                } else {
                    self.finish(&tag, Done::ok("Begin TLS negotiation now"));
                    return Action::StartTls;
                }
            }
            CommandBody::Login { username, password } => match self.may_login() {
                Err(d) => Err(d),
                Ok(()) => {
                    return Action::Login {
                        tag,
                        user: String::from_utf8_lossy(username.as_ref()).into_owned(),
                        password: String::from_utf8_lossy(password.declassify().as_ref())
                            .into_owned(),
                    }
                }
            },
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => match self.may_login() {
                Err(d) => Err(d),
                Ok(()) if !mechanism.as_ref().eq_ignore_ascii_case("PLAIN") => Err(Done::no(
                    Some("CANNOT"),
                    "Unsupported authentication mechanism",
                )),
                Ok(()) => match initial_response {
                    Some(ir) => return self.plain(tag, ir.declassify()),
                    None => return Action::SaslContinue { tag },
                },
            },
            CommandBody::Enable { capabilities } => self.authenticated().map(|()| {
                self.enable(capabilities.as_ref());
                Done::ok("ENABLE completed")
            }),
            CommandBody::Id { .. } => {
                self.out.line(&format!(
                    "* ID (\"name\" \"mailsrv\" \"version\" \"{}\")",
                    env!("CARGO_PKG_VERSION")
                ));
                Ok(Done::ok("ID completed"))
            }
            CommandBody::Namespace => self.authenticated().map(|()| {
                self.out.line("* NAMESPACE ((\"\" \".\")) NIL NIL");
                Done::ok("NAMESPACE completed")
            }),
            CommandBody::Select { mailbox, .. } => self.select(&mailbox, false),
            CommandBody::Examine { mailbox, .. } => self.select(&mailbox, true),
            CommandBody::Create { mailbox } => self.with_name(&mailbox, |mb, name| {
                mb.create(name).map(|()| Done::ok("CREATE completed"))
            }),
            CommandBody::Delete { mailbox } => self.delete(&mailbox),
            CommandBody::Rename { from, to } => self.rename(&from, &to),
            CommandBody::Subscribe { mailbox } => self.with_name(&mailbox, |mb, name| {
                mb.subscribe(name, true)
                    .map(|()| Done::ok("SUBSCRIBE completed"))
                    .map_err(MailboxError::Io)
            }),
            CommandBody::Unsubscribe { mailbox } => self.with_name(&mailbox, |mb, name| {
                mb.subscribe(name, false)
                    .map(|()| Done::ok("UNSUBSCRIBE completed"))
                    .map_err(MailboxError::Io)
            }),
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status_command(&mailbox, item_names.as_ref()),
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => self.append(&mailbox, &flags, date, appended.as_deref(), &message),
            CommandBody::Idle => match self.authenticated() {
                Ok(()) => return Action::Idle { tag },
                Err(d) => Err(d),
            },
            CommandBody::Check => self.in_selected().map(|()| Done::ok("CHECK completed")),
            CommandBody::Close => self.in_selected().map(|()| {
                self.saved.clear();
                if let Some(mut f) = self.selected.take() {
                    if !f.read_only {
                        if let Err(e) = f.expunge(None) {
                            tracing::error!("imap CLOSE expunge: {e}");
                        }
                    }
                }
                Done::ok("CLOSE completed")
            }),
            CommandBody::Unselect => self.in_selected().map(|()| {
                self.saved.clear();
                self.selected = None;
                Done::ok("UNSELECT completed")
            }),
            CommandBody::Expunge => self.expunge(None),
            CommandBody::ExpungeUid { sequence_set } => self.expunge(Some(&sequence_set)),
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                ..
            } => return self.start_fetch(tag, &sequence_set, macro_or_item_names, uid),
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                ..
            } => self.store(&sequence_set, kind, response, &flags, uid),
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&sequence_set, &mailbox, uid, false),
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&sequence_set, &mailbox, uid, true),
            CommandBody::GetQuotaRoot { mailbox } => self.get_quota_root(&mailbox),
            CommandBody::GetQuota { root } => self.authenticated().and_then(|()| {
                if root.as_ref() != b"" || self.quota.is_none() {
                    return Err(Done::no(Some("NONEXISTENT"), "No such quota root"));
                }
                self.quota_line()?;
                Ok(Done::ok("GETQUOTA completed"))
            }),
            // RFC 9208 4.3: the limits are the admin's (mailctl user quota).
            CommandBody::SetQuota { .. } => self.authenticated().and_then(|()| {
                Err(Done::no(
                    Some("NOPERM"),
                    "Quotas are set by the administrator",
                ))
            }),
            _ => Err(Done::bad("Command not supported")),
        };
        self.complete(&tag, done, uid_or_other);
        self.next_action()
    }

    /// Whether a BYE went out and the connection must close.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Continue, unless a BYE went out.
    fn next_action(&self) -> Action {
        if self.closing {
            Action::Close
        } else {
            Action::Continue
        }
    }

    /// Send pending untagged updates, then the tagged result.
    fn complete(&mut self, tag: &str, done: Result<Done, Done>, allow_expunge: bool) {
        self.updates(allow_expunge);
        let done = done.unwrap_or_else(|d| d);
        self.finish(tag, done);
    }

    /// Write untagged responses for changes made by others (RFC 9051
    /// 7.5.1: EXPUNGE only when `allow_expunge`).
    pub fn updates(&mut self, allow_expunge: bool) {
        let mode = self.fetch_mode();
        let Some(folder) = self.selected.as_mut() else {
            return;
        };
        let changes = match folder.refresh(allow_expunge) {
            Ok(c) => c,
            Err(e)
                if e.get_ref()
                    .is_some_and(|e| e.is::<folder::UidValidityChanged>()) =>
            {
                tracing::warn!("imap: {}: UIDVALIDITY changed", folder.path.display());
                self.out.line(
                    "* BYE [UNAVAILABLE] The mailbox's UIDs were renumbered; select it again",
                );
                self.closing = true;
                return;
            }
            Err(e) => {
                tracing::error!("imap: refreshing {}: {e}", folder.path.display());
                return;
            }
        };
        let Changes {
            expunged,
            exists,
            flags_changed,
            keywords_changed,
        } = changes;
        if keywords_changed {
            let flags = flag_list(folder);
            self.out.line(&format!("* FLAGS ({flags})"));
        }
        for seq in expunged {
            self.out.line(&format!("* {seq} EXPUNGE"));
        }
        if let Some(n) = exists {
            self.out.line(&format!("* {n} EXISTS"));
            if !mode.rev2 {
                let recent = folder.recent_count();
                self.out.line(&format!("* {recent} RECENT"));
            }
        }
        for seq in flags_changed {
            if let Some(m) = folder.message(seq as usize - 1) {
                let mut b = format!("* {seq} FETCH (UID {} FLAGS ", m.uid).into_bytes();
                fetch::write_flags(&mut b, &m, mode);
                b.extend_from_slice(b")\r\n");
                self.out.buf().extend_from_slice(&b);
            }
        }
    }

    /// IDLE ended with DONE (or anything else: RFC 2177 3 wants DONE).
    pub fn idle_done(&mut self, tag: &str, done: bool) {
        let result = if done {
            Ok(Done::ok("IDLE terminated"))
        } else {
            Err(Done::bad("Expected DONE"))
        };
        self.complete(tag, result, true);
    }

    fn may_login(&self) -> Result<(), Done> {
        if self.user.is_some() {
            return Err(Done::bad("Already logged in"));
        }
        if !self.login_allowed() {
            return Err(Done::no(
                Some("PRIVACYREQUIRED"),
                "Use STARTTLS or the IMAPS port before logging in",
            ));
        }
        Ok(())
    }

    fn plain(&mut self, tag: String, response: &[u8]) -> Action {
        // RFC 4616 2: [authzid] NUL authcid NUL passwd
        let mut parts = response.split(|&b| b == 0);
        let (authz, authc, pass) = (parts.next(), parts.next(), parts.next());
        match (authz, authc, pass, parts.next()) {
            (Some(authz), Some(authc), Some(pass), None) if authz.is_empty() || authz == authc => {
                Action::Login {
                    tag,
                    user: String::from_utf8_lossy(authc).into_owned(),
                    password: String::from_utf8_lossy(pass).into_owned(),
                }
            }
            _ => {
                self.finish(
                    &tag,
                    Done::no(Some("AUTHENTICATIONFAILED"), "Invalid PLAIN response"),
                );
                Action::Continue
            }
        }
    }

    /// The client's answer to the AUTHENTICATE continuation.
    pub fn sasl_response(&mut self, tag: String, line: &[u8]) -> Action {
        use base64::Engine;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == b"*" {
            self.finish(&tag, Done::bad("AUTHENTICATE cancelled"));
            return Action::Continue;
        }
        match base64::engine::general_purpose::STANDARD.decode(line) {
            Ok(decoded) => self.plain(tag, &decoded),
            Err(_) => {
                self.finish(&tag, Done::bad("Invalid base64"));
                Action::Continue
            }
        }
    }

    /// The credentials were right: `root` is the user's Maildir.
    pub fn logged_in(&mut self, tag: &str, user: &str, root: &Path, quota: Option<u64>) {
        self.user = Some(user.to_string());
        self.quota = quota;
        self.mailboxes = Some(Mailboxes::new(root, self.cache.clone()));
        let caps = self.capabilities();
        self.finish(
            tag,
            Done::ok_code(format!("CAPABILITY {caps}"), "Logged in"),
        );
    }

    /// The login failed; `code` and `text` say why.
    pub fn login_failed(&mut self, tag: &str, code: &str, text: &str) {
        self.finish(tag, Done::no(Some(code), text));
    }

    fn authenticated(&self) -> Result<(), Done> {
        if self.mailboxes.is_some() {
            Ok(())
        } else {
            Err(Done::bad("Log in first"))
        }
    }

    fn in_selected(&self) -> Result<(), Done> {
        self.authenticated()?;
        if self.selected.is_some() {
            Ok(())
        } else {
            Err(Done::bad("No mailbox selected"))
        }
    }

    /// The user's folders lock, shared (see [`common::maildir::FOLDERS_LOCK`]).
    fn lock_folders(&self) -> Option<common::safeio::LockGuard> {
        let root = self.mailboxes.as_ref()?.root();
        match common::safeio::lock_shared(&root.join(common::maildir::FOLDERS_LOCK)) {
            Ok(guard) => Some(guard),
            Err(e) => {
                tracing::warn!("{}: cannot take the folders lock: {e}", root.display());
                None
            }
        }
    }

    fn mailboxes(&self) -> Result<&Mailboxes, Done> {
        self.mailboxes
            .as_ref()
            .ok_or_else(|| Done::bad("Log in first"))
    }

    fn enable(&mut self, capabilities: &[CapabilityEnable]) {
        let mut enabled = Vec::new();
        for c in capabilities {
            let name = c.to_string().to_ascii_uppercase();
            match name.as_str() {
                "IMAP4REV2" if !self.rev2 => {
                    self.rev2 = true;
                    self.utf8 = true;
                    enabled.push("IMAP4rev2");
                }
                "UTF8=ACCEPT" if !self.utf8 => {
                    self.utf8 = true;
                    enabled.push("UTF8=ACCEPT");
                }
                _ => {}
            }
        }
        self.out
            .line(format!("* ENABLED {}", enabled.join(" ")).trim_end());
    }

    /// A client's mailbox argument as a checked name.
    fn name(&self, mailbox: &Mailbox) -> Result<MailboxName, Done> {
        self.name_bytes(&mailbox_bytes(mailbox))
    }

    fn name_bytes(&self, raw: &[u8]) -> Result<MailboxName, Done> {
        let text = std::str::from_utf8(raw)
            .map_err(|_| Done::no(Some("CANNOT"), "Mailbox name is not valid UTF-8"))?;
        if !self.utf8 && !text.is_ascii() {
            return Err(Done::no(
                Some("CANNOT"),
                "8-bit mailbox names need ENABLE IMAP4rev2 or UTF8=ACCEPT",
            ));
        }
        MailboxName::from_client(text, self.utf8)
            .map_err(|e| Done::no(Some("CANNOT"), e.to_string()))
    }

    fn with_name(
        &mut self,
        mailbox: &Mailbox,
        f: impl FnOnce(&Mailboxes, &MailboxName) -> Result<Done, MailboxError>,
    ) -> Result<Done, Done> {
        let mb = self.mailboxes()?;
        // A name ending in the delimiter declares a hierarchy (RFC 9051 6.3.4).
        let raw = mailbox_bytes(mailbox);
        let name = match raw.strip_suffix(&[DELIMITER as u8]) {
            Some(stem) if !stem.is_empty() => self.name_bytes(stem)?,
            _ => self.name(mailbox)?,
        };
        f(mb, &name).map_err(Done::from)
    }

    fn select(&mut self, mailbox: &Mailbox, read_only: bool) -> Result<Done, Done> {
        self.authenticated()?;
        // RFC 5182 2.1: a new mailbox starts with no saved result.
        self.saved.clear();
        if self.selected.take().is_some() {
            // RFC 9051 7.1: the old mailbox is closed before the new opens.
            self.out.line("* OK [CLOSED] Previous mailbox closed");
        }
        let name = self.name(mailbox)?;
        let mb = self.mailboxes()?;
        if !mb.exists(&name) {
            return Err(Done::no(Some("NONEXISTENT"), "Mailbox does not exist"));
        }
        let folder =
            Folder::open(&mb.path(&name), read_only, self.cache.clone()).map_err(server_error)?;
        let flags = flag_list(&folder);
        self.out.line(&format!("* FLAGS ({flags})"));
        if read_only {
            self.out.line("* OK [PERMANENTFLAGS ()] Read-only mailbox");
        } else {
            self.out.line(&format!(
                "* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted"
            ));
        }
        self.out.line(&format!("* {} EXISTS", folder.exists()));
        if !self.rev2 {
            self.out
                .line(&format!("* {} RECENT", folder.recent_count()));
            if let Some(i) = folder.files().iter().position(|m| !m.has(SystemFlag::Seen)) {
                self.out
                    .line(&format!("* OK [UNSEEN {}] First unseen", i + 1));
            }
        }
        self.out.line(&format!(
            "* OK [UIDVALIDITY {}] UIDs valid",
            folder.uid_validity
        ));
        self.out.line(&format!(
            "* OK [UIDNEXT {}] Predicted next UID",
            folder.uid_next
        ));
        if self.rev2 {
            let mut b = b"* LIST () \".\" ".to_vec();
            wire::astring(&mut b, name.to_client(true).as_bytes(), true);
            b.extend_from_slice(b"\r\n");
            self.out.buf().extend_from_slice(&b);
        }
        self.selected = Some(folder);
        Ok(if read_only {
            Done::ok_code("READ-ONLY", "EXAMINE completed")
        } else {
            Done::ok_code("READ-WRITE", "SELECT completed")
        })
    }

    fn delete(&mut self, mailbox: &Mailbox) -> Result<Done, Done> {
        let name = {
            self.authenticated()?;
            self.name(mailbox)?
        };
        let path = self.mailboxes()?.path(&name);
        let result = self.with_name(mailbox, |mb, n| {
            mb.delete(n).map(|()| Done::ok("DELETE completed"))
        });
        if result.is_ok() && self.selected.as_ref().is_some_and(|f| f.path == path) {
            self.selected = None;
        }
        result
    }

    fn rename(&mut self, from: &Mailbox, to: &Mailbox) -> Result<Done, Done> {
        self.authenticated()?;
        let from = self.name(from)?;
        let to = self.name(to)?;
        let mb = self.mailboxes()?;
        mb.rename(&from, &to)?;
        Ok(Done::ok("RENAME completed"))
    }

    fn list_or_lsub(&mut self, list: &ListCommand, lsub: bool) -> Result<Done, Done> {
        let utf8 = self.utf8;
        let mb = self.mailboxes()?;
        let word = if lsub { "LSUB" } else { "LIST" };
        // RFC 9051 6.3.9: an empty pattern asks for the delimiter.
        if list.patterns.len() == 1 && list.patterns[0].is_empty() {
            self.out.line(&format!("* {word} (\\Noselect) \".\" \"\""));
            return Ok(Done::ok(format!("{word} completed")));
        }
        let all = mb.all().map_err(server_error)?;
        let subscribed: BTreeSet<String> = mb
            .subscriptions()
            .map_err(server_error)?
            .into_iter()
            .collect();
        let existing: BTreeSet<String> = all.iter().map(|n| n.as_str().to_string()).collect();
        // Every name with its ancestors (which may not exist themselves).
        let mut universe: BTreeSet<String> = existing.clone();
        for name in existing.iter().chain(subscribed.iter()) {
            let mut n = name.as_str();
            while let Some((parent, _)) = n.rsplit_once(DELIMITER) {
                universe.insert(parent.to_string());
                n = parent;
            }
        }
        universe.extend(subscribed.iter().cloned());
        if list
            .patterns
            .iter()
            .any(|p| p.len() + list.reference.len() > MAX_PATTERN)
        {
            return Err(Done::bad("Pattern too long"));
        }
        let patterns: Vec<String> = list
            .patterns
            .iter()
            .map(|p| {
                let mut full = list.reference.clone();
                full.extend_from_slice(p);
                let text = String::from_utf8_lossy(&full).into_owned();
                let text = if utf8 {
                    text
                } else {
                    decode_mutf7(&text).unwrap_or(text)
                };
                collapse_wildcards(&text)
            })
            .collect();
        let show_subscribed = list.return_subscribed || list.select_subscribed;
        let mut lines = Vec::new();
        let mut status_names = Vec::new();
        // INBOX first, as clients expect, then by name.
        let ordered = universe
            .iter()
            .filter(|n| n.as_str() == "INBOX")
            .chain(universe.iter().filter(|n| n.as_str() != "INBOX"));
        for name in ordered {
            if !patterns.iter().any(|p| wildcard_match(p, name)) {
                continue;
            }
            let exists = existing.contains(name);
            let is_subscribed = subscribed.contains(name);
            if list.select_subscribed && !is_subscribed {
                continue;
            }
            let parsed = MailboxName::from_client(name, true).ok();
            let special = parsed.as_ref().and_then(mailboxes::special_use);
            if list.select_special_use && special.is_none() {
                continue;
            }
            let prefix = format!("{name}{DELIMITER}");
            let has_children = universe.iter().any(|n| n.starts_with(&prefix));
            let mut attrs: Vec<&str> = Vec::new();
            if lsub {
                if !exists {
                    attrs.push("\\Noselect");
                }
            } else {
                if !exists {
                    attrs.push(if list.extended || is_subscribed {
                        "\\NonExistent"
                    } else {
                        "\\Noselect"
                    });
                }
                attrs.push(if has_children {
                    "\\HasChildren"
                } else {
                    "\\HasNoChildren"
                });
                if show_subscribed && is_subscribed {
                    attrs.push("\\Subscribed");
                }
                if let Some(s) = special {
                    attrs.push(s);
                }
            }
            let client_name = if utf8 {
                name.clone()
            } else {
                common::mailbox_name::encode_mutf7(name)
            };
            let mut b = format!("* {word} ({}) \".\" ", attrs.join(" ")).into_bytes();
            wire::astring(&mut b, client_name.as_bytes(), utf8);
            b.extend_from_slice(b"\r\n");
            lines.push(b);
            if exists {
                if let (Some(items), Some(parsed)) = (&list.return_status, parsed) {
                    status_names.push((lines.len() - 1, parsed, items.clone()));
                }
            }
        }
        // RFC 5819 2: each STATUS right after its LIST.
        let mut statuses: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, name, items) in status_names {
            if let Ok(info) = mb.status(&name) {
                let items: Vec<StatusDataItemName> =
                    items.iter().filter_map(|s| status_item(s)).collect();
                statuses.push((i, status_line(&name, &info, &items, utf8)));
            }
        }
        let mut statuses = statuses.into_iter().peekable();
        for (i, line) in lines.into_iter().enumerate() {
            self.out.buf().extend_from_slice(&line);
            while statuses.peek().is_some_and(|(j, _)| *j == i) {
                if let Some((_, s)) = statuses.next() {
                    self.out.buf().extend_from_slice(&s);
                }
            }
        }
        Ok(Done::ok(format!("{word} completed")))
    }

    /// GETQUOTAROOT (RFC 9208 4.2.2): every folder is in the user's one
    /// root, "", when the user has a limit, and in none otherwise.
    fn get_quota_root(&mut self, mailbox: &Mailbox) -> Result<Done, Done> {
        self.authenticated()?;
        let name = self.name(mailbox)?;
        let mut b = b"* QUOTAROOT ".to_vec();
        wire::astring(&mut b, name.to_client(self.utf8).as_bytes(), self.utf8);
        if self.quota.is_some() {
            b.extend_from_slice(b" \"\"");
        }
        b.extend_from_slice(b"\r\n");
        self.out.buf().extend_from_slice(&b);
        if self.quota.is_some() {
            self.quota_line()?;
        }
        Ok(Done::ok("GETQUOTAROOT completed"))
    }

    /// `* QUOTA "" (STORAGE <used> <limit>)`, in KiB (RFC 9208 5.1).
    fn quota_line(&mut self) -> Result<(), Done> {
        let limit = self.quota.unwrap_or(0);
        let used = self.storage_used()?;
        self.out.line(&format!(
            "* QUOTA \"\" (STORAGE {} {})",
            used.div_ceil(1024),
            limit / 1024
        ));
        Ok(())
    }

    fn storage_used(&self) -> Result<u64, Done> {
        let root = self.mailboxes()?.root().to_path_buf();
        common::quota::usage(&root)
            .map(|u| u.bytes)
            .map_err(server_error)
    }

    /// NO [OVERQUOTA] (RFC 9208 4.4) when `adding` more bytes would pass
    /// the user's limit.
    fn check_room(&self, adding: u64) -> Result<(), Done> {
        let Some(limit) = self.quota else {
            return Ok(());
        };
        if self.storage_used()?.saturating_add(adding) > limit {
            return Err(Done::no(
                Some("OVERQUOTA"),
                "Quota exceeded (mailbox is full)",
            ));
        }
        Ok(())
    }

    fn status_command(
        &mut self,
        mailbox: &Mailbox,
        items: &[StatusDataItemName],
    ) -> Result<Done, Done> {
        self.authenticated()?;
        let name = self.name(mailbox)?;
        let utf8 = self.utf8;
        let selected_path = self.selected.as_ref().map(|f| f.path.clone());
        let mb = self.mailboxes()?;
        let info: StatusInfo = if selected_path.as_deref() == Some(mb.path(&name).as_path()) {
            match self.selected.as_mut() {
                Some(f) => mailboxes::status_of(f),
                None => return Err(Done::no(Some("NONEXISTENT"), "Mailbox does not exist")),
            }
        } else {
            mb.status(&name)?
        };
        let line = status_line(&name, &info, items, utf8);
        self.out.buf().extend_from_slice(&line);
        Ok(Done::ok("STATUS completed"))
    }

    fn append(
        &mut self,
        mailbox: &Mailbox,
        flags: &[Flag],
        date: Option<imap_types::datetime::DateTime>,
        appended: Option<&Path>,
        literal: &imap_types::extensions::binary::LiteralOrLiteral8,
    ) -> Result<Done, Done> {
        self.authenticated()?;
        let name = self.name(mailbox)?;
        let mb = self.mailboxes()?;
        if !mb.exists(&name) {
            return Err(Done::no(Some("TRYCREATE"), "Mailbox does not exist"));
        }
        let adding = match (appended, literal) {
            (Some(path), _) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            (None, imap_types::extensions::binary::LiteralOrLiteral8::Literal(l)) => {
                l.as_ref().len() as u64
            }
            (None, imap_types::extensions::binary::LiteralOrLiteral8::Literal8(l)) => {
                l.data.as_ref().len() as u64
            }
        };
        self.check_room(adding)?;
        let mb = self.mailboxes()?;
        let flags = message_flags(flags);
        let date = date.map(|d| {
            let secs = d.as_ref().timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        });
        let dest = mb.path(&name);
        let result = match appended {
            Some(path) => {
                let file = std::fs::File::open(path).map_err(server_error)?;
                folder::append(&dest, &self.policy.hostname, file, &flags, date)
            }
            None => {
                let bytes: &[u8] = match literal {
                    imap_types::extensions::binary::LiteralOrLiteral8::Literal(l) => l.as_ref(),
                    imap_types::extensions::binary::LiteralOrLiteral8::Literal8(l) => {
                        l.data.as_ref()
                    }
                };
                if bytes.is_empty() {
                    return Err(Done::no(None, "Empty message"));
                }
                folder::append(&dest, &self.policy.hostname, bytes, &flags, date)
            }
        };
        let (validity, uid) = result?;
        Ok(Done::ok_code(
            format!("APPENDUID {validity} {uid}"),
            "APPEND completed",
        ))
    }

    /// Indexes of the messages a sequence set names (sequence numbers or
    /// UIDs).
    fn resolve(&self, set: &SequenceSet, uid: bool) -> Result<Vec<usize>, Done> {
        let Some(folder) = self.selected.as_ref() else {
            return Err(Done::bad("No mailbox selected"));
        };
        if uid {
            let numbers = NumberSet::resolve(set, folder.last_uid());
            Ok(folder
                .files()
                .iter()
                .enumerate()
                .filter(|(_, m)| numbers.contains(m.uid))
                .map(|(i, _)| i)
                .collect())
        } else {
            let count = folder.exists();
            let numbers = NumberSet::resolve(set, count);
            if numbers.exceeds(count) && !self.saved_empty {
                return Err(Done::bad("Invalid message sequence number"));
            }
            Ok((0..count as usize)
                .filter(|i| numbers.contains(*i as u32 + 1))
                .collect())
        }
    }

    fn expunge(&mut self, uids: Option<&SequenceSet>) -> Result<Done, Done> {
        self.in_selected()?;
        let chosen: Option<BTreeSet<u32>> = match uids {
            Some(set) => {
                let idx = self.resolve(set, true)?;
                let folder = self
                    .selected
                    .as_ref()
                    .ok_or_else(|| Done::bad("No mailbox selected"))?;
                Some(idx.iter().map(|&i| folder.files()[i].uid).collect())
            }
            None => None,
        };
        let Some(folder) = self.selected.as_mut() else {
            return Err(Done::bad("No mailbox selected"));
        };
        if folder.read_only {
            return Err(Done::no(Some("READ-ONLY"), "Mailbox is read-only"));
        }
        let expunged = folder.expunge(chosen.as_ref()).map_err(server_error)?;
        for seq in expunged {
            self.out.line(&format!("* {seq} EXPUNGE"));
        }
        Ok(Done::ok("EXPUNGE completed"))
    }

    fn start_fetch(
        &mut self,
        tag: String,
        set: &SequenceSet,
        items: MacroOrMessageDataItemNames<'static>,
        uid: bool,
    ) -> Action {
        let resolved = self.in_selected().and_then(|()| self.resolve(set, uid));
        let indexes = match resolved {
            Ok(i) => i,
            Err(done) => {
                self.complete(&tag, Err(done), uid);
                return Action::Continue;
            }
        };
        let mut items: Vec<MessageDataItemName<'static>> = match items {
            MacroOrMessageDataItemNames::Macro(m) => {
                let mut v = vec![
                    MessageDataItemName::Flags,
                    MessageDataItemName::InternalDate,
                    MessageDataItemName::Rfc822Size,
                ];
                if matches!(m, Macro::All | Macro::Full) {
                    v.push(MessageDataItemName::Envelope);
                }
                if matches!(m, Macro::Full) {
                    v.push(MessageDataItemName::Body);
                }
                v
            }
            MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
        };
        // The same item twice is answered once.
        let mut unique = Vec::with_capacity(items.len());
        for item in items.drain(..) {
            if !unique.contains(&item) {
                unique.push(item);
            }
        }
        self.pending_fetch = Some(PendingFetch {
            tag,
            indexes,
            next: 0,
            items: unique,
            uid,
            missing: false,
            seen_changed: false,
        });
        self.resume()
    }

    /// Go on with a FETCH that stopped to let its output be sent, so a
    /// FETCH of a whole mailbox never sits in memory at once.
    pub fn resume(&mut self) -> Action {
        let Some(mut p) = self.pending_fetch.take() else {
            return Action::Continue;
        };
        let mode = self.fetch_mode();
        let Some(folder) = self.selected.as_mut() else {
            self.complete(&p.tag, Err(Done::bad("No mailbox selected")), p.uid);
            return Action::Continue;
        };
        while p.next < p.indexes.len() && self.out.buffered() < FETCH_CHUNK {
            let i = p.indexes[p.next];
            p.next += 1;
            let mut items_here = p.items.clone();
            let Some(file) = folder.files().get(i).cloned() else {
                continue;
            };
            if !folder.read_only && fetch::marks_seen(&file, &p.items) {
                let mut flags = file.flags.clone();
                flags.system.insert(SystemFlag::Seen);
                if let Err(e) = folder.set_flags(i, flags) {
                    self.complete(&p.tag, Err(Done::from(e)), p.uid);
                    return Action::Continue;
                }
                p.seen_changed = true;
                // RFC 9051 6.4.5: the changed flags go with the response.
                if !items_here.contains(&MessageDataItemName::Flags) {
                    items_here.push(MessageDataItemName::Flags);
                }
            }
            let (Some(m), false) = (folder.message(i), folder.is_gone(i)) else {
                p.missing = true;
                continue;
            };
            let mark = self.out.mark();
            let target = fetch::Target {
                folder: &folder.path,
                cache: &self.cache,
            };
            let written = fetch::write_fetch(
                &mut self.out,
                i as u32 + 1,
                &m,
                target,
                &items_here,
                p.uid,
                mode,
            );
            let failure = match written {
                Ok(()) => continue,
                Err(FetchError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.out.rollback(mark);
                    folder.mark_gone(i);
                    p.missing = true;
                    continue;
                }
                Err(FetchError::UnknownCte) => {
                    Done::no(Some("UNKNOWN-CTE"), "Unknown Content-Transfer-Encoding")
                }
                Err(FetchError::TooLarge) => {
                    Done::no(Some("LIMIT"), "The response for one message is too large")
                }
                Err(FetchError::Io(e)) => server_error(e),
            };
            self.out.rollback(mark);
            self.complete(&p.tag, Err(failure), p.uid);
            return Action::Continue;
        }
        if p.next < p.indexes.len() {
            self.pending_fetch = Some(p);
            return Action::Resume;
        }
        let mut done = Ok(Done::ok("FETCH completed"));
        if p.seen_changed {
            if let Err(e) = folder.sync_flags() {
                done = Err(server_error(e));
            }
        }
        if let Err(e) = self.cache.save(&folder.path) {
            tracing::warn!("{}: saving the folder cache: {e}", folder.path.display());
        }
        if p.missing && done.is_ok() {
            // RFC 9051 7.1: some messages went away meanwhile.
            done = Err(Done::no(
                Some("EXPUNGEISSUED"),
                "Some messages were expunged",
            ));
        }
        self.complete(&p.tag, done, p.uid);
        self.next_action()
    }

    fn store(
        &mut self,
        set: &SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: &[Flag],
        uid: bool,
    ) -> Result<Done, Done> {
        self.in_selected()?;
        let indexes = self.resolve(set, uid)?;
        let wanted = message_flags(flags);
        let mode = self.fetch_mode();
        let Some(folder) = self.selected.as_mut() else {
            return Err(Done::bad("No mailbox selected"));
        };
        if folder.read_only {
            return Err(Done::no(Some("READ-ONLY"), "Mailbox is read-only"));
        }
        for i in indexes {
            let Some(current) = folder.files().get(i).map(|m| m.flags.clone()) else {
                continue;
            };
            let new = match kind {
                StoreType::Replace => wanted.clone(),
                StoreType::Add => {
                    // Keywords compare case-insensitively (RFC 9051 2.3.2):
                    // an existing spelling is kept.
                    let mut keywords = current.keywords.clone();
                    for k in &wanted.keywords {
                        if !keywords.iter().any(|c| c.eq_ignore_ascii_case(k)) {
                            keywords.insert(k.clone());
                        }
                    }
                    MessageFlags {
                        system: current.system.union(&wanted.system).copied().collect(),
                        keywords,
                    }
                }
                StoreType::Remove => MessageFlags {
                    system: current.system.difference(&wanted.system).copied().collect(),
                    keywords: current
                        .keywords
                        .iter()
                        .filter(|k| !wanted.keywords.iter().any(|w| w.eq_ignore_ascii_case(k)))
                        .cloned()
                        .collect(),
                },
            };
            folder.set_flags(i, new)?;
            let m = folder.message(i).filter(|_| !folder.is_gone(i));
            if let (StoreResponse::Answer, Some(m)) = (response, m) {
                let mut b = format!("* {} FETCH (", i + 1).into_bytes();
                if uid {
                    b.extend_from_slice(format!("UID {} ", m.uid).as_bytes());
                }
                b.extend_from_slice(b"FLAGS ");
                fetch::write_flags(&mut b, &m, mode);
                b.extend_from_slice(b")\r\n");
                self.out.buf().extend_from_slice(&b);
            }
        }
        folder.sync_flags().map_err(server_error)?;
        Ok(Done::ok("STORE completed"))
    }

    fn copy(
        &mut self,
        set: &SequenceSet,
        mailbox: &Mailbox,
        uid: bool,
        moving: bool,
    ) -> Result<Done, Done> {
        self.in_selected()?;
        let indexes = self.resolve(set, uid)?;
        let name = self.name(mailbox)?;
        let mb = self.mailboxes()?;
        if !mb.exists(&name) {
            return Err(Done::no(Some("TRYCREATE"), "Mailbox does not exist"));
        }
        let dest = mb.path(&name);
        let hostname = self.policy.hostname.clone();
        let Some(folder) = self.selected.as_mut() else {
            return Err(Done::bad("No mailbox selected"));
        };
        if moving && folder.read_only {
            return Err(Done::no(Some("READ-ONLY"), "Mailbox is read-only"));
        }
        let word = if moving { "MOVE" } else { "COPY" };
        if indexes.is_empty() {
            return Ok(Done::ok(format!("{word} completed")));
        }
        if dest == folder.path && moving {
            return Err(Done::no(
                Some("CANNOT"),
                "Source and destination are the same",
            ));
        }
        if !moving && self.quota.is_some() {
            // A MOVE keeps the user's usage; a COPY adds to it.
            let adding: u64 = indexes
                .iter()
                .filter_map(|&i| folder.files().get(i))
                .filter_map(|m| std::fs::metadata(m.path(&folder.path)).ok())
                .map(|meta| meta.len())
                .sum();
            self.check_room(adding)?;
        }
        let Some(folder) = self.selected.as_mut() else {
            return Err(Done::bad("No mailbox selected"));
        };
        let (validity, pairs) = folder.copy_to(&indexes, &dest, &hostname)?;
        let code = if pairs.is_empty() {
            None
        } else {
            let src: Vec<u32> = pairs.iter().map(|p| p.0).collect();
            let dst: Vec<u32> = pairs.iter().map(|p| p.1).collect();
            Some(format!(
                "COPYUID {validity} {} {}",
                compact(&src),
                compact(&dst)
            ))
        };
        if !moving {
            return Ok(match code {
                Some(c) => Done::ok_code(c, "COPY completed"),
                None => Done::ok("COPY completed"),
            });
        }
        // RFC 6851 4.3: COPYUID goes untagged, before the EXPUNGEs.
        if let Some(c) = &code {
            self.out.line(&format!("* OK [{c}] Moved"));
        }
        let moved: BTreeSet<u32> = pairs.iter().map(|p| p.0).collect();
        let expunged = folder.remove_uids(&moved).map_err(server_error)?;
        for seq in expunged {
            self.out.line(&format!("* {seq} EXPUNGE"));
        }
        Ok(Done::ok("MOVE completed"))
    }

    /// Keep a SEARCH result for `$` (RFC 5182 2.1): all of it, or only
    /// MIN and/or MAX when those were asked without ALL or COUNT.
    fn save_result(&mut self, uid: bool, found: &[u32], ret: &SearchReturn) {
        let Some(folder) = self.selected.as_ref() else {
            return;
        };
        let mut chosen: Vec<u32> = found.to_vec();
        if (ret.min || ret.max) && !ret.all && !ret.count {
            chosen = [
                ret.min.then(|| found.iter().min()),
                ret.max.then(|| found.iter().max()),
            ]
            .into_iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        }
        let uids = chosen
            .into_iter()
            .filter_map(|n| {
                if uid {
                    Some(n)
                } else {
                    folder.files().get(n as usize - 1).map(|m| m.uid)
                }
            })
            .collect::<BTreeSet<u32>>();
        self.saved = uids.into_iter().collect();
    }

    /// Put the saved SEARCH result where a command says `$` (RFC 5182 2.2),
    /// as UIDs or as the sequence numbers those messages have now.
    pub fn expand_saved(&mut self, message: &[u8]) -> Option<Vec<u8>> {
        self.saved_empty = false;
        if !message.contains(&b'$') {
            return None;
        }
        let folder = self.selected.as_ref()?;
        let seqs: Vec<u32> = self
            .saved
            .iter()
            .filter_map(|&uid| folder.index_of(uid))
            .map(|i| i as u32 + 1)
            .collect();
        // An empty result names no message; a number no message has stands
        // for it, and `resolve` lets it pass (RFC 5182 2.2: not an error).
        let uids = if self.saved.is_empty() {
            NO_MESSAGE.to_string()
        } else {
            compact(&self.saved)
        };
        let sequence = if seqs.is_empty() {
            NO_MESSAGE.to_string()
        } else {
            compact(&seqs)
        };
        let replaced = syntax::replace_saved_marker(message, &uids, &sequence)?;
        self.saved_empty = seqs.is_empty();
        Some(replaced)
    }

    fn search(
        &mut self,
        tag: &str,
        uid: bool,
        ret: Option<SearchReturn>,
        charset: Option<String>,
        criteria: &[SearchKey],
    ) -> Result<Done, Done> {
        if let Some(c) = charset.as_deref() {
            if c != "UTF-8" && c != "US-ASCII" {
                return Err(Done::no(
                    Some("BADCHARSET (UTF-8 US-ASCII)"),
                    "Unsupported charset",
                ));
            }
        }
        let Some(folder) = self.selected.as_mut() else {
            return Err(Done::bad("No mailbox selected"));
        };
        let largest_seq = folder.exists();
        let largest_uid = folder.last_uid();
        let path = &folder.path;
        let mut found = Vec::new();
        for (i, m) in folder.messages().enumerate() {
            if folder.is_gone(i) {
                continue;
            }
            let uid_value = m.uid;
            let place = (path.as_path(), &*self.cache);
            let mut c = Candidate::new(i as u32 + 1, m, place, largest_seq, largest_uid);
            match search::matches_all(criteria, &mut c) {
                Ok(true) => found.push(if uid { uid_value } else { i as u32 + 1 }),
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(server_error(e)),
            }
        }
        if let Err(e) = self.cache.save(path) {
            tracing::warn!("{}: saving searched fields: {e}", path.display());
        }
        if let Some(r) = ret.as_ref().filter(|r| r.save) {
            self.save_result(uid, &found, r);
            // RFC 5182 2.1: SAVE alone gets no ESEARCH.
            if !(r.min || r.max || r.all || r.count) {
                return Ok(Done::ok("SEARCH completed"));
            }
        }
        let ret = match (ret, self.rev2) {
            (Some(r), _) => Some(r),
            // RFC 9051 6.4.4: an IMAP4rev2 client gets ESEARCH.
            (None, true) => Some(SearchReturn {
                all: true,
                ..SearchReturn::default()
            }),
            (None, false) => None,
        };
        match ret {
            None => {
                let list: Vec<String> = found.iter().map(u32::to_string).collect();
                let sep = if list.is_empty() { "" } else { " " };
                self.out.line(&format!("* SEARCH{sep}{}", list.join(" ")));
            }
            Some(r) => {
                let mut line = format!("* ESEARCH (TAG \"{tag}\")");
                if uid {
                    line.push_str(" UID");
                }
                if r.min {
                    if let Some(v) = found.iter().min() {
                        line.push_str(&format!(" MIN {v}"));
                    }
                }
                if r.max {
                    if let Some(v) = found.iter().max() {
                        line.push_str(&format!(" MAX {v}"));
                    }
                }
                if r.count {
                    line.push_str(&format!(" COUNT {}", found.len()));
                }
                if r.all && !found.is_empty() {
                    let mut sorted = found.clone();
                    sorted.sort_unstable();
                    line.push_str(&format!(" ALL {}", compact(&sorted)));
                }
                self.out.line(&line);
            }
        }
        Ok(Done::ok("SEARCH completed"))
    }
}

fn mailbox_bytes(mailbox: &Mailbox) -> Vec<u8> {
    match mailbox {
        Mailbox::Inbox => b"INBOX".to_vec(),
        Mailbox::Other(o) => o.inner().as_ref().to_vec(),
    }
}

/// FLAGS of a folder: the system flags and its keywords.
fn flag_list(folder: &Folder) -> String {
    let mut flags: Vec<&str> = SystemFlag::ALL.iter().map(|f| f.imap_name()).collect();
    flags.extend(folder.keywords.all());
    flags.join(" ")
}

/// Flags from a client's list; \Recent cannot be set (RFC 9051 2.3.2).
fn message_flags(flags: &[Flag]) -> MessageFlags {
    let mut out = MessageFlags::default();
    for f in flags {
        match f {
            Flag::Answered => {
                out.system.insert(SystemFlag::Answered);
            }
            Flag::Deleted => {
                out.system.insert(SystemFlag::Deleted);
            }
            Flag::Draft => {
                out.system.insert(SystemFlag::Draft);
            }
            Flag::Flagged => {
                out.system.insert(SystemFlag::Flagged);
            }
            Flag::Seen => {
                out.system.insert(SystemFlag::Seen);
            }
            Flag::Keyword(k) => {
                out.keywords.insert(k.as_ref().to_string());
            }
            Flag::Extension(_) => {}
        }
    }
    out
}

fn status_item(name: &str) -> Option<StatusDataItemName> {
    Some(match name {
        "MESSAGES" => StatusDataItemName::Messages,
        "RECENT" => StatusDataItemName::Recent,
        "UIDNEXT" => StatusDataItemName::UidNext,
        "UIDVALIDITY" => StatusDataItemName::UidValidity,
        "UNSEEN" => StatusDataItemName::Unseen,
        "DELETED" => StatusDataItemName::Deleted,
        "SIZE" => StatusDataItemName::Size,
        _ => return None,
    })
}

fn status_line(
    name: &MailboxName,
    info: &StatusInfo,
    items: &[StatusDataItemName],
    utf8: bool,
) -> Vec<u8> {
    let mut parts = Vec::new();
    for item in items {
        parts.push(match item {
            StatusDataItemName::Messages => format!("MESSAGES {}", info.messages),
            StatusDataItemName::Recent => format!("RECENT {}", info.recent),
            StatusDataItemName::UidNext => format!("UIDNEXT {}", info.uid_next),
            StatusDataItemName::UidValidity => format!("UIDVALIDITY {}", info.uid_validity),
            StatusDataItemName::Unseen => format!("UNSEEN {}", info.unseen),
            StatusDataItemName::Deleted => format!("DELETED {}", info.deleted),
            StatusDataItemName::Size => format!("SIZE {}", info.size),
            StatusDataItemName::DeletedStorage => continue,
        });
    }
    let mut b = b"* STATUS ".to_vec();
    wire::astring(&mut b, name.to_client(utf8).as_bytes(), utf8);
    b.extend_from_slice(format!(" ({})\r\n", parts.join(" ")).as_bytes());
    b
}

/// Longest LIST reference plus pattern, in bytes.
const MAX_PATTERN: usize = 1024;

/// A pattern with each run of wildcards made one: `*` if the run has one,
/// else `%` (the same matches, without the matcher's cost growing with
/// the run).
fn collapse_wildcards(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut run: Option<char> = None;
    for c in pattern.chars() {
        if c == '*' || c == '%' {
            run = Some(if run == Some('*') || c == '*' {
                '*'
            } else {
                '%'
            });
            continue;
        }
        if let Some(w) = run.take() {
            out.push(w);
        }
        out.push(c);
    }
    out.extend(run);
    out
}

/// LIST pattern match (RFC 9051 6.3.9): `*` matches anything, `%`
/// anything but the hierarchy delimiter. INBOX matches case-insensitively.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let inbox = name
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("INBOX"))
        && (n.len() == 5 || n[5] == DELIMITER);
    let same = |j: usize, pc: char| {
        if inbox && j < 5 {
            n[j].eq_ignore_ascii_case(&pc)
        } else {
            n[j] == pc
        }
    };
    // reachable[j]: the pattern so far matches the first j characters.
    let mut reachable = vec![false; n.len() + 1];
    reachable[0] = true;
    for &pc in &p {
        let mut next = vec![false; n.len() + 1];
        for j in 0..=n.len() {
            if !reachable[j] {
                continue;
            }
            match pc {
                '*' | '%' => {
                    next[j] = true;
                    let mut k = j;
                    while k < n.len() && (pc == '*' || n[k] != DELIMITER) {
                        k += 1;
                        next[k] = true;
                    }
                }
                _ if j < n.len() && same(j, pc) => next[j + 1] = true,
                _ => {}
            }
        }
        reachable = next;
    }
    reachable[n.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", "a.b"));
        assert!(wildcard_match("%", "a"));
        assert!(!wildcard_match("%", "a.b"));
        assert!(wildcard_match("a.%", "a.b"));
        assert!(wildcard_match("inbox", "INBOX"));
        assert!(!wildcard_match("sent", "Sent"));
        assert!(wildcard_match("S*t", "Sent"));
        assert!(wildcard_match("%.%", "a.b"));
        assert!(wildcard_match("Entw*", "Entwürfe"));
        assert!(wildcard_match("inbox.%", "INBOX.x"));
        assert!(!wildcard_match("inboxes", "INBOXES"));
        assert_eq!(collapse_wildcards("a**%b%%c*"), "a*b%c*");
    }
}
