//! HTML building blocks of the status pages: escaping (every value from the database, the
//! nodes or the configuration goes through [`escape`]; relative paths may contain anything),
//! number formats, and the page frame with its stylesheet. No external assets: the page must
//! work where the router runs, offline.

/// `text` safe inside HTML text and double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration in seconds, short: `45s`, `12m 3s`, `5h 2m`, `3d 4h`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Bytes in binary units: `512 B`, `1.5 GiB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n.max(0) as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Readable on a phone (one column, tables scroll sideways) and on a wide screen (cards side
/// by side).
const STYLE: &str = "
:root{--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--muted:#57606a;--line:#d0d7de;--bg:#f6f8fa}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
header,main,footer{max-width:1400px;margin:0 auto;padding:0 16px}
header{padding-top:12px}
h1{font-size:1.3em;margin:.3em 0}
h2{font-size:1.15em;margin:1.2em 0 .4em;border-bottom:1px solid var(--line);padding-bottom:.2em}
h3{font-size:1em;margin:.8em 0 .3em}
.summary{font-size:1.15em;font-weight:600;padding:12px 14px;border-radius:6px;margin:8px 0}
.summary.ok{background:#dafbe1;color:var(--ok);border:1px solid #aceebb}
.summary.problem{background:#ffebe9;color:var(--bad);border:1px solid #ffcecb}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 12px;background:#fff;min-width:0}
.card.full{grid-column:1/-1}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.95em}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;word-break:break-word}
th{background:var(--bg);font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:var(--ok);font-weight:600}
.badv{color:var(--bad);font-weight:600}
.warnv{color:var(--warn);font-weight:600}
.muted{color:var(--muted)}
ul.problems{padding-left:0;list-style:none;margin:0}
ul.problems li{border-left:4px solid var(--bad);background:#fff8f8;padding:6px 10px;margin:6px 0;border-radius:0 4px 4px 0}
ul.problems li.warning{border-color:var(--warn);background:#fffbea}
.action{display:block;color:#1f2328;margin-top:2px}
code{background:var(--bg);padding:1px 4px;border-radius:3px;font-size:.92em}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}
dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0;word-break:break-word}
.bar{height:8px;background:var(--bg);border-radius:4px;overflow:hidden;min-width:60px}
.bar span{display:block;height:100%;background:#0969da}
form.lookup{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
form.lookup input{padding:4px 6px;font:inherit}
footer{color:var(--muted);font-size:.85em;padding:16px}
@media (max-width:600px){body{font-size:14px}th,td{padding:3px 5px}}
";

/// A whole page: `title` (escaped here), `body` (already HTML), and the refresh script when
/// `refresh_seconds` is given (plain JavaScript: reloads unless the box is unticked).
pub fn page(title: &str, body: &str, refresh_seconds: Option<u32>) -> String {
    let refresh = refresh_seconds
        .map(|s| {
            format!(
                "<script>(function(){{var box=document.getElementById('autorefresh');\
                 setInterval(function(){{if(!box||box.checked)location.reload();}},{ms});}})();</script>",
                ms = u64::from(s) * 1000
            )
        })
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head><body>{body}{refresh}</body></html>\n",
        title = escape(title),
    )
}

/// `text` escaped, with `backquoted` parts as code: the problems' advice names commands.
pub fn with_code(text: &str) -> String {
    escape(text)
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("<code>{part}</code>")
            } else {
                part.to_string()
            }
        })
        .collect()
}

/// A yes/no cell with a class for its colour and a data attribute to test against.
pub fn verdict(good: bool, yes: &str, no: &str) -> String {
    if good {
        format!("<span class=\"good\">{}</span>", escape(yes))
    } else {
        format!("<span class=\"badv\">{}</span>", escape(no))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn backquotes_become_code() {
        assert_eq!(
            with_code("run `praefect <x>` now"),
            "run <code>praefect &lt;x&gt;</code> now"
        );
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(duration(5.4), "5s");
        assert_eq!(duration(125.0), "2m 5s");
        assert_eq!(duration(7300.0), "2h 1m");
        assert_eq!(duration(90000.0), "1d 1h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
