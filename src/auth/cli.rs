//! `optiverse-collab token` (mint a token and print how to use it) and
//! `optiverse-collab revoke` (revoke a session's tokens on a running server).

use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use collab_core::session::Role;

use super::api::{session_claim, Minted};
use super::{Keys, MintRequest, ALL_SESSIONS};
use crate::config::KeyArgs;
use crate::server::path::normalize_name;

/// The commands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mints a token signed with the server's key, and prints it with ready-to-paste
    /// connection strings.
    Token(TokenArgs),
    /// Revokes every token of a session issued before now, on a running server (its
    /// connections are closed 4403; refused from then on, across restarts).
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The session it is good for (`*`: every session).
    #[arg(long)]
    pub session: String,
    /// view (read, presence), edit (read, write) or admin (every session and the HTTP API).
    #[arg(long, default_value = "edit")]
    pub role: Role,
    /// Binds the token to this user name: no other name may be used with it, and nobody
    /// without it may take or replace that name.
    #[arg(long)]
    pub user: Option<String>,
    /// How long it is valid: a number with s, m, h or d (`7d`, `12h`, `90s`).
    #[arg(long, default_value = "7d", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// The server's address as clients reach it, for the connection strings.
    #[arg(long, default_value = "http://localhost:8765")]
    pub url: String,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The session whose tokens are revoked.
    #[arg(long)]
    pub session: String,
    /// The running server's own HTTP address (plain http: on the server's machine, its port
    /// rather than a TLS proxy's).
    #[arg(long, default_value = "http://127.0.0.1:8765")]
    pub url: String,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `7d`, `12h`, `30m`, `90s` or plain seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86_400.0,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 7d or 12h"))?;
    match Duration::try_from_secs_f64(value * scale) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("{s:?} is not a positive duration")),
    }
}

fn keys(args: &KeyArgs) -> Result<Keys, String> {
    Keys::from_args(args)?
        .ok_or_else(|| "no key: give --auth-key-file, --auth-key or COLLAB_AUTH_KEY".to_owned())
}

/// Runs `token`: the printed text, or why not.
pub fn token(args: &TokenArgs) -> Result<String, String> {
    let keys = keys(&args.key)?;
    let session = session_claim(&args.session).ok_or("invalid session id")?;
    let user = match &args.user {
        Some(user) => Some(normalize_name(user).ok_or("invalid user name")?),
        None => None,
    };
    let request = MintRequest {
        session,
        role: args.role,
        user,
        ttl: args.ttl,
    };
    let (token, claims) = keys.mint(&request, SystemTime::now())?;
    let minted = Minted::new(&args.url, token, &claims);
    let mut text = format!(
        "token ({} on {}{}, until {}):\n  {}\n\n",
        minted.role.as_str(),
        if claims.session == ALL_SESSIONS {
            "every session"
        } else {
            &claims.session
        },
        minted
            .user
            .as_deref()
            .map(|u| format!(", as {u}"))
            .unwrap_or_default(),
        minted.expires_at,
        minted.token
    );
    text.push_str(&format!(
        "Desktop app, server URL:\n  {}\ny-websocket:\n  {}\nBrowser:\n  {}\nHTTP:\n  {}\n",
        minted.desktop_url, minted.yjs_url, minted.browser_url, minted.curl
    ));
    Ok(text)
}

/// Runs `revoke`: asks the running server, with a short-lived admin token of its key.
pub async fn revoke(args: &RevokeArgs) -> Result<String, String> {
    let keys = keys(&args.key)?;
    let session = normalize_name(&args.session).ok_or("invalid session id")?;
    let request = MintRequest {
        session: ALL_SESSIONS.to_owned(),
        role: Role::Admin,
        user: None,
        ttl: Duration::from_secs(60),
    };
    let (token, _) = keys.mint(&request, SystemTime::now())?;
    let encoded =
        percent_encoding::utf8_percent_encode(&session, percent_encoding::NON_ALPHANUMERIC);
    let url = format!(
        "{}/api/sessions/{encoded}/revoke",
        args.url.trim_end_matches('/')
    );
    let (status, body) = post(&url, &token).await?;
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("the server answered {status}: {body}"))
    }
}

/// `POST url` with a bearer token, over plain HTTP/1.1 (hyper's client).
async fn post(url: &str, token: &str) -> Result<(u16, String), String> {
    use axum::http::{header, Request};
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("--url must be http:// (the server's own port)".to_owned());
    }
    let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
        return Err(format!("{url}: no host"));
    };
    let stream = tokio::net::TcpStream::connect((host, uri.port_u16().unwrap_or(80)))
        .await
        .map_err(|e| format!("cannot reach {authority}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::post(uri.clone())
        .header(header::HOST, authority.as_str())
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(axum::body::Body::empty())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_ttl("0d").is_err());
        assert!(parse_ttl("soon").is_err());
        assert!(parse_ttl("3w").is_err());
    }
}
