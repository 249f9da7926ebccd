//! A complete command (its lines and literals) decoded into a request:
//! imap-codec for most of the grammar, our own parser for LIST and
//! SEARCH RETURN (see [`super::syntax`]).

use imap_codec::decode::Decoder;
use imap_codec::CommandCodec;
use imap_types::command::CommandBody;
use imap_types::search::SearchKey;
use imap_types::IntoStatic;

use super::syntax::{self, ListCommand, SearchReturn};

/// A decoded client command.
#[derive(Debug)]
pub enum Request {
    Imap {
        tag: String,
        body: CommandBody<'static>,
    },
    /// LIST, or LSUB (same grammar without extensions).
    List {
        tag: String,
        list: ListCommand,
        lsub: bool,
    },
    Search {
        tag: String,
        uid: bool,
        ret: Option<SearchReturn>,
        charset: Option<String>,
        criteria: Vec<SearchKey<'static>>,
    },
    /// Unparsable: `BAD` with the tag when one could be read.
    Bad { tag: Option<String>, text: String },
}

fn bad(tag: Option<String>, text: impl Into<String>) -> Request {
    Request::Bad {
        tag,
        text: text.into(),
    }
}

/// Decode `message` (lines and literals, ending in CRLF).
pub fn decode(message: &[u8]) -> Request {
    let Some((tag, name)) = syntax::command_name(message) else {
        return bad(None, "Missing tag or command");
    };
    if !valid_tag(&tag) {
        return bad(None, "Invalid tag");
    }
    match name.as_str() {
        "LIST" | "LSUB" => {
            let lsub = name == "LSUB";
            return match syntax::parse_list(message) {
                Ok(list) if lsub && list.extended => bad(Some(tag), "LSUB takes no options"),
                Ok(list) => Request::List { tag, list, lsub },
                Err(e) => bad(Some(tag), format!("{name}: {e}")),
            };
        }
        "SEARCH" | "UID SEARCH" => {
            return match syntax::split_search_return(message) {
                Ok(Some((ret, rest))) => search(&tag, &rest, Some(ret)),
                Ok(None) => search(&tag, message, None),
                Err(e) => bad(Some(tag), format!("SEARCH: {e}")),
            }
        }
        _ => {}
    }
    match CommandCodec::default().decode(message) {
        Ok(([], cmd)) => Request::Imap {
            tag,
            body: cmd.body.into_static(),
        },
        Ok(_) => bad(Some(tag), "Unexpected characters after the command"),
        Err(_) if name.is_empty() => bad(Some(tag), "Missing command"),
        Err(_) => bad(
            Some(tag),
            format!("Syntax error in {name} or unknown command"),
        ),
    }
}

fn search(tag: &str, message: &[u8], ret: Option<SearchReturn>) -> Request {
    match CommandCodec::default().decode(message) {
        Ok(([], cmd)) => match cmd.body.into_static() {
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => Request::Search {
                tag: tag.to_string(),
                uid,
                ret,
                charset: charset.map(|c| {
                    let s: &str = match &c {
                        imap_types::core::Charset::Atom(a) => a.as_ref(),
                        imap_types::core::Charset::Quoted(q) => q.as_ref(),
                    };
                    s.to_ascii_uppercase()
                }),
                criteria: criteria.into_iter().collect(),
            },
            _ => bad(Some(tag.to_string()), "Syntax error in SEARCH"),
        },
        _ => bad(Some(tag.to_string()), "Syntax error in SEARCH"),
    }
}

/// RFC 9051 9: tag = 1*<any ASTRING-CHAR except "+">.
fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(b, b'+' | b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind() {
        assert!(matches!(
            decode(b"a1 NOOP\r\n"),
            Request::Imap {
                body: CommandBody::Noop,
                ..
            }
        ));
        assert!(matches!(
            decode(b"a1 LIST \"\" *\r\n"),
            Request::List { .. }
        ));
        match decode(b"a1 UID SEARCH RETURN (COUNT) CHARSET utf-8 UNSEEN\r\n") {
            Request::Search {
                uid,
                ret,
                charset,
                criteria,
                ..
            } => {
                assert!(uid && ret.unwrap().count);
                assert_eq!(charset.as_deref(), Some("UTF-8"));
                assert_eq!(criteria, vec![SearchKey::Unseen]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(b"a1 FROB\r\n"),
            Request::Bad { tag: Some(_), .. }
        ));
        assert!(matches!(
            decode(b"+ NOOP\r\n"),
            Request::Bad { tag: None, .. }
        ));
        assert!(matches!(decode(b"\r\n"), Request::Bad { tag: None, .. }));
        // APPEND with the placeholder the reader leaves for a streamed literal.
        assert!(matches!(
            decode(b"a APPEND INBOX (\\Seen) {0}\r\n\r\n"),
            Request::Imap {
                body: CommandBody::Append { .. },
                ..
            }
        ));
    }
}
