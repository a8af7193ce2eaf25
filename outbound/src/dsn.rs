//! Delivery status notifications (RFC 3464): the bounce a sender gets for recipients that
//! could not be reached, as a multipart/report with a human-readable part, the machine-
//! readable `message/delivery-status` part and the headers of the original message.

use service::partition::QueueEntry;

/// Most header bytes of the original message quoted in the report.
const ORIGINAL_HEADERS_MAX: usize = 32 * 1024;

/// The bounce for `entry`'s failed recipients, from the mailer daemon of `hostname`.
pub fn bounce(
    entry: &QueueEntry,
    original: &[u8],
    hostname: &str,
    now: time::OffsetDateTime,
) -> Vec<u8> {
    let id = hex::encode(entry.id);
    let boundary = format!("{id}/{hostname}");
    let date = rfc2822(now);
    let arrival = time::OffsetDateTime::from_unix_timestamp(entry.created)
        .map(rfc2822)
        .unwrap_or_else(|_| date.clone());
    let mut human = String::new();
    let mut status = String::new();
    for r in entry.failed() {
        let reply = r.reply.as_deref().unwrap_or("delivery failed");
        human.push_str(&format!("<{}>: {}\r\n", r.address, one_line(reply)));
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            r.address,
            status_code(reply),
            one_line(reply)
        ));
    }
    let headers = original_headers(original);
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    out.push_str(&format!("To: <{}>\r\n", entry.sender));
    out.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    out.push_str(&format!("Date: {date}\r\n"));
    out.push_str(&format!("Message-ID: <{id}.dsn@{hostname}>\r\n"));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    out.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");
    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n\r\n");
    out.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n\
         I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients. The reasons follow.\r\n\r\n{human}\r\n"
    ));
    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Type: message/delivery-status\r\n\r\n");
    out.push_str(&format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Mailgrid-Queue-ID: {id}\r\nArrival-Date: {arrival}\r\n{status}\r\n"
    ));
    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Type: text/rfc822-headers\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&headers);
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

fn rfc2822(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default()
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The enhanced status code of a reply ("550 5.1.1 ..." gives 5.1.1), or the generic one
/// for its class.
fn status_code(reply: &str) -> String {
    let mut words = reply.split_ascii_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(esc) = words.next() {
        let parts: Vec<&str> = esc.split('.').collect();
        let numeric = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if numeric && (esc.starts_with('5') || esc.starts_with('4')) {
            return format!("5{}", &esc[1..]);
        }
    }
    if code.starts_with('5') {
        "5.0.0".into()
    } else {
        // Given up on after retries (4xx or no connection until the entry expired).
        "5.4.7".into()
    }
}

/// The header section of the original message, bounded, ending in CRLF.
fn original_headers(body: &[u8]) -> Vec<u8> {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(body.len());
    let mut headers = body[..end.min(ORIGINAL_HEADERS_MAX)].to_vec();
    if !headers.ends_with(b"\r\n") {
        headers.extend_from_slice(b"\r\n");
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use service::partition::{QueueRecipient, RecipientState};
    use service::types::BodyHash;

    #[test]
    fn a_bounce_is_a_delivery_status_report_for_the_failed_recipients() {
        // Goal: the report parses as multipart/report and names every failed recipient (and
        // only those) with its status and diagnostic, plus the original headers.
        let rcpt = |a: &str, state, reply: &str| QueueRecipient {
            address: a.into(),
            state,
            reply: Some(reply.into()),
        };
        let entry = QueueEntry {
            id: [0xab; 16],
            sender: "alice@example.test".into(),
            recipients: vec![
                rcpt(
                    "gone@far.test",
                    RecipientState::Failed,
                    "550 5.1.1 no such user",
                ),
                rcpt("ok@far.test", RecipientState::Delivered, "250 ok"),
                rcpt(
                    "slow@far.test",
                    RecipientState::Failed,
                    "451 4.4.1 timed out",
                ),
            ],
            body: BodyHash([0; 32]),
            size: 0,
            created: 1_700_000_000,
            next_attempt: 0,
            attempts: 3,
            held: false,
            last_error: None,
        };
        let original = b"Subject: hello\r\nFrom: alice@example.test\r\n\r\nsecret body\r\n";
        let dsn = bounce(
            &entry,
            original,
            "mx.example.test",
            time::OffsetDateTime::UNIX_EPOCH,
        );
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(text
            .contains("Final-Recipient: rfc822; gone@far.test\r\nAction: failed\r\nStatus: 5.1.1"));
        assert!(text
            .contains("Final-Recipient: rfc822; slow@far.test\r\nAction: failed\r\nStatus: 5.4.1"));
        assert!(!text.contains("ok@far.test"));
        assert!(text.contains("Subject: hello"));
        assert!(
            !text.contains("secret body"),
            "the report quotes headers only"
        );
        use mail_parser::MimeHeaders;
        let parsed = mail_parser::MessageParser::default().parse(&dsn).unwrap();
        assert_eq!(
            parsed.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
        let ct = parsed.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(parsed.parts.len(), 4, "the container and three parts");
    }
}
