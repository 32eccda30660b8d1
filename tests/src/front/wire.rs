//! The EC2 Query protocol as the front needs it: the form-encoded request, AWS's error document,
//! and two small edits of a response body (an id out of a create answer, an item out of a
//! describe answer).

use std::collections::BTreeMap;

/// The parameters of one EC2 Query request (`Action=…&Version=…&Foo.1=…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(pub BTreeMap<String, String>);

impl Params {
    pub fn parse(body: &[u8], query: Option<&str>) -> Params {
        let mut m = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()).chain(form_urlencoded::parse(body)) {
            m.insert(k.into_owned(), v.into_owned());
        }
        Params(m)
    }

    /// The form body again (after a rewrite).
    pub fn encode(&self) -> String {
        form_urlencoded::Serializer::new(String::new()).extend_pairs(self.0.iter()).finish()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn action(&self) -> &str {
        self.get("Action").unwrap_or("")
    }

    pub fn number(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    /// The values of a list parameter `Key.1`, `Key.2`, … (the Query protocol's list shape).
    pub fn list(&self, key: &str) -> Vec<&str> {
        let prefix = format!("{key}.");
        self.0
            .iter()
            .filter(|(k, _)| k.strip_prefix(&prefix).is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit())))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Whether EC2 meters an action in the non-mutating (describe) bucket. EC2's request throttling
/// page: "Non-mutating actions: Describe*, List*, Search*, Get*".
pub fn is_non_mutating(action: &str) -> bool {
    ["Describe", "List", "Search", "Get"].iter().any(|p| action.starts_with(p))
}

/// The document EC2 answers an error with (EC2 API reference, "Error codes": the `Response`
/// element holding `Errors/Error/{Code,Message}` and a `RequestID`).
pub fn error_xml(code: &str, message: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        escape(code),
        escape(message),
        escape(request_id)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The text of the first `<tag>…</tag>` in `xml`.
pub fn first_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(&xml[start..start + len])
}

/// The text of every `<tag>…</tag>` in `xml`, in order.
pub fn all_texts(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(len) = rest.find(&close) else { break };
        out.push(rest[..len].to_string());
        rest = &rest[len + close.len()..];
    }
    out
}

/// Removes from `xml` each top-level `<item>` of the `<set>` element whose own `<key>` child (at
/// the item's first level) is in `hide`. Nested items (addresses, tags) are kept as they are.
pub fn drop_items(xml: &str, set: &str, key: &str, hide: &dyn Fn(&str) -> bool) -> String {
    let open_set = format!("<{set}>");
    let Some(set_start) = xml.find(&open_set).map(|i| i + open_set.len()) else { return xml.to_string() };
    let Some(set_len) = xml[set_start..].find(&format!("</{set}>")) else { return xml.to_string() };
    let body = &xml[set_start..set_start + set_len];
    let mut kept = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(i) = rest.find("<item>") {
        kept.push_str(&rest[..i]);
        let item_start = i;
        // Walk to the matching </item>, counting nested items.
        let mut depth = 0usize;
        let mut pos = i;
        let end = loop {
            let next_open = rest[pos..].find("<item>").map(|j| pos + j);
            let next_close = rest[pos..].find("</item>").map(|j| pos + j);
            match (next_open, next_close) {
                (Some(o), Some(c)) if o < c => {
                    depth += 1;
                    pos = o + "<item>".len();
                }
                (_, Some(c)) => {
                    depth -= 1;
                    pos = c + "</item>".len();
                    if depth == 0 {
                        break Some(pos);
                    }
                }
                _ => break None,
            }
        };
        let Some(end) = end else {
            kept.push_str(&rest[item_start..]);
            rest = "";
            break;
        };
        let item = &rest[item_start..end];
        if !item_key(item, key).is_some_and(hide) {
            kept.push_str(item);
        }
        rest = &rest[end..];
    }
    kept.push_str(rest);
    format!("{}{}{}", &xml[..set_start], kept, &xml[set_start + set_len..])
}

/// The text of `<key>` at the first level of one `<item>…</item>` (not inside a nested item).
fn item_key<'a>(item: &'a str, key: &str) -> Option<&'a str> {
    let inner = &item["<item>".len()..item.len() - "</item>".len()];
    let mut depth = 0usize;
    let mut pos = 0;
    let open = format!("<{key}>");
    loop {
        let candidates = [inner[pos..].find("<item>"), inner[pos..].find("</item>"), inner[pos..].find(&open)];
        let (which, at) =
            candidates.iter().enumerate().filter_map(|(w, a)| a.map(|a| (w, pos + a))).min_by_key(|x| x.1)?;
        match which {
            0 => {
                depth += 1;
                pos = at + 6;
            }
            1 => {
                depth = depth.saturating_sub(1);
                pos = at + 7;
            }
            _ if depth == 0 => return first_text(&inner[at..], key),
            _ => pos = at + open.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_the_body_and_lists_keep_their_order_of_keys() {
        let p = Params::parse(
            b"Action=AssignPrivateIpAddresses&NetworkInterfaceId=eni-1&PrivateIpAddress.1=10.0.0.5&PrivateIpAddress.2=10.0.0.6&PrivateIpAddress.Foo=x",
            None,
        );
        assert_eq!(p.action(), "AssignPrivateIpAddresses");
        assert_eq!(p.list("PrivateIpAddress"), vec!["10.0.0.5", "10.0.0.6"]);
        assert_eq!(p.number("NetworkInterfaceId"), None);
        assert_eq!(Params::parse(p.encode().as_bytes(), None), p, "encode round-trips");
    }

    #[test]
    fn the_metering_class_follows_the_action_name() {
        for (a, want) in [
            ("DescribeNetworkInterfaces", true),
            ("GetConsoleOutput", true),
            ("CreateRoute", false),
            ("AssignPrivateIpAddresses", false),
        ] {
            assert_eq!(is_non_mutating(a), want, "{a}");
        }
    }

    #[test]
    fn error_documents_escape_and_carry_the_code() {
        let x = error_xml("RouteAlreadyExists", "a <b> & c", "r1");
        assert!(x.contains("<Code>RouteAlreadyExists</Code>"));
        assert!(x.contains("a &lt;b&gt; &amp; c"));
        assert_eq!(first_text(&x, "Code"), Some("RouteAlreadyExists"));
    }

    #[test]
    fn drop_items_removes_only_the_named_top_level_items() {
        let xml = "<R><networkInterfaceSet>\
            <item><networkInterfaceId>eni-a</networkInterfaceId><privateIpAddressesSet><item><x>1</x></item></privateIpAddressesSet></item>\
            <item><tagSet><item><networkInterfaceId>eni-a</networkInterfaceId></item></tagSet><networkInterfaceId>eni-b</networkInterfaceId></item>\
            </networkInterfaceSet></R>";
        let out = drop_items(xml, "networkInterfaceSet", "networkInterfaceId", &|id| id == "eni-a");
        assert!(!out.contains("<x>1</x>"), "eni-a's item went with its nested items: {out}");
        assert!(out.contains("eni-b"), "{out}");
        let out = drop_items(xml, "networkInterfaceSet", "networkInterfaceId", &|id| id == "eni-b");
        assert!(out.contains("<x>1</x>") && !out.contains("eni-b"), "eni-b found at its item's first level: {out}");
        let none = drop_items(xml, "networkInterfaceSet", "networkInterfaceId", &|_| false);
        assert_eq!(none, xml);
    }
}
