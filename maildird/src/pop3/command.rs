//! POP3 command parser (RFC 1939 section 3, RFC 2449, RFC 2595, RFC 5034):
//! one line in, one typed command out. Pure.

/// RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
pub const MAX_COMMAND_LINE: usize = 255;

/// A POP3 command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    /// The password may contain spaces (RFC 1939 section 7, PASS).
    Pass(String),
    /// `AUTH mechanism [initial-response]` (RFC 5034).
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// `AUTH` alone lists the mechanisms (a widely used extension).
    AuthList,
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Top(u32, u32),
    Uidl(Option<u32>),
    Quit,
    Capa,
    Stls,
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command")]
    Unknown,
    #[error("{0}")]
    Syntax(&'static str),
}

/// Parse one line (without its CRLF).
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, Some(r)),
        None => (line, None),
    };
    let args: Vec<&str> = rest
        .map(|r| r.split(' ').filter(|a| !a.is_empty()).collect())
        .unwrap_or_default();
    let none = |cmd: Command| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::Syntax("this command takes no arguments"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "USER" => match args.as_slice() {
            [name] => Ok(Command::User(name.to_string())),
            _ => Err(ParseError::Syntax("USER takes one name")),
        },
        "PASS" => match rest {
            Some(pw) if !pw.is_empty() => Ok(Command::Pass(pw.to_string())),
            _ => Err(ParseError::Syntax("PASS takes a password")),
        },
        "AUTH" => match args.as_slice() {
            [] => Ok(Command::AuthList),
            [m] => Ok(Command::Auth {
                mechanism: m.to_ascii_uppercase(),
                initial: None,
            }),
            [m, ir] => Ok(Command::Auth {
                mechanism: m.to_ascii_uppercase(),
                initial: Some(ir.to_string()),
            }),
            _ => Err(ParseError::Syntax("AUTH mechanism [initial-response]")),
        },
        "STAT" => none(Command::Stat),
        "LIST" => optional_number(&args).map(Command::List),
        "RETR" => one_number(&args).map(Command::Retr),
        "DELE" => one_number(&args).map(Command::Dele),
        "NOOP" => none(Command::Noop),
        "RSET" => none(Command::Rset),
        "TOP" => match args.as_slice() {
            [m, n] => Ok(Command::Top(number(m)?, count(n)?)),
            _ => Err(ParseError::Syntax("TOP msg n")),
        },
        "UIDL" => optional_number(&args).map(Command::Uidl),
        "QUIT" => none(Command::Quit),
        "CAPA" => none(Command::Capa),
        "STLS" => none(Command::Stls),
        _ => Err(ParseError::Unknown),
    }
}

/// A message number: 1 or more (RFC 1939 section 3).
fn number(s: &str) -> Result<u32, ParseError> {
    s.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or(ParseError::Syntax("invalid message number"))
}

fn count(s: &str) -> Result<u32, ParseError> {
    s.parse::<u32>()
        .map_err(|_| ParseError::Syntax("invalid line count"))
}

fn one_number(args: &[&str]) -> Result<u32, ParseError> {
    match args {
        [n] => number(n),
        _ => Err(ParseError::Syntax("a message number is required")),
    }
}

fn optional_number(args: &[&str]) -> Result<Option<u32>, ParseError> {
    match args {
        [] => Ok(None),
        [n] => number(n).map(Some),
        _ => Err(ParseError::Syntax("at most one message number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(
            parse("user alice@x.test"),
            Ok(Command::User("alice@x.test".into()))
        );
        assert_eq!(parse("PASS a b  c"), Ok(Command::Pass("a b  c".into())));
        assert_eq!(parse("list"), Ok(Command::List(None)));
        assert_eq!(parse("LIST 3"), Ok(Command::List(Some(3))));
        assert_eq!(parse("TOP 1 0"), Ok(Command::Top(1, 0)));
        assert_eq!(parse("uidl 2"), Ok(Command::Uidl(Some(2))));
        assert_eq!(
            parse("AUTH plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGEAYg==".into())
            })
        );
        assert_eq!(parse("AUTH"), Ok(Command::AuthList));
    }

    #[test]
    fn bad_lines_are_errors() {
        assert_eq!(parse("FROB"), Err(ParseError::Unknown));
        assert!(parse("RETR").is_err());
        assert!(parse("RETR 0").is_err());
        assert!(parse("RETR x").is_err());
        assert!(parse("DELE 1 2").is_err());
        assert!(parse("STAT now").is_err());
        assert!(parse("PASS").is_err());
        assert!(parse("TOP 1").is_err());
        assert!(parse("LIST 99999999999").is_err());
    }
}
