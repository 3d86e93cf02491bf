//! `GET /`: the live dashboard, one page served from the binary (`dashboard.html`: HTML, CSS
//! and a little JavaScript, no build step). It reads what any client may: `/api/v1/overview`
//! and `/api/v1/topics` each second, a story's receipt from `/api/v1/messages/{id}/receipts`,
//! and the stories themselves from `/api/v1/stream`.
//!
//! It sits behind the API's token. A browser cannot put a bearer token on an `EventSource`, so
//! the sign-in form sets it as a cookie (HttpOnly, SameSite=Strict), which the API and the
//! stream accept like the header.

use super::{Request, Response};
use crate::broker::Broker;

pub const COOKIE: &str = "herald_token";

const PAGE: &str = include_str!("dashboard.html");

pub fn page(_broker: &Broker, _req: &Request) -> Response {
    Response {
        status: 200,
        content_type: "text/html; charset=utf-8",
        body: PAGE.as_bytes().to_vec(),
        extra_headers: vec![
            ("cache-control", "no-store".to_owned()),
            // The page loads nothing from elsewhere and is framed by no one.
            (
                "content-security-policy",
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'"
                    .to_owned(),
            ),
        ],
    }
}

/// The sign-in page: a form asking for the API's token.
pub fn sign_in(tried: bool) -> Response {
    let note = if tried { "<p class=bad>That token is not the API's token.</p>" } else { "" };
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>Herald: sign in</title>\
         <style>body{{font:16px system-ui;margin:4em auto;max-width:24em}}.bad{{color:#b00}}</style>\
         <h1>Herald</h1>{note}<form method=get action=/><label>API token ([http] token)<br>\
         <input type=password name=token autofocus size=40></label> <button>Sign in</button></form>"
    );
    let mut r = Response {
        status: 401,
        content_type: "text/html; charset=utf-8",
        body: body.into_bytes(),
        extra_headers: Vec::new(),
    };
    r.extra_headers.push(("cache-control", "no-store".to_owned()));
    r
}

/// The answer to a sign-in with the right token: the cookie, and back to the page without the
/// token in its address.
pub fn signed_in(token: &str) -> Response {
    Response {
        status: 303,
        content_type: "text/plain",
        body: b"signed in\n".to_vec(),
        extra_headers: vec![
            ("location", "/".to_owned()),
            ("set-cookie", format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")),
        ],
    }
}
