//! The `download` stage against the shared mirror and a local HTTP server.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::Scratch;

fn mirror() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/mirror"))
}

const LAREQA: &str = "https://raw.githubusercontent.com/google-research-datasets/lareqa/9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c/xquad-r";

/// sha256 and size of a mirrored URL, from the mirror's manifest.
fn manifest(url: &str) -> (String, u64) {
    let text = std::fs::read_to_string(mirror().join("MANIFEST.tsv")).unwrap();
    let line = text
        .lines()
        .find(|l| l.split('\t').next() == Some(url))
        .unwrap_or_else(|| panic!("{url} not in the mirror manifest"));
    let fields: Vec<&str> = line.split('\t').collect();
    (fields[1].to_string(), fields[2].parse().unwrap())
}

fn files_dir(s: &Scratch, stage: &str) -> PathBuf {
    let shown = s.ok(&["show", stage]).stdout;
    let path = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   files  "))
        .expect("show lists the files output");
    s.path(path)
}

#[test]
fn downloads_from_the_mirror_with_checksums() {
    let s = Scratch::new();
    let en = format!("{LAREQA}/en.json");
    let de = format!("{LAREQA}/de.json");
    let (en_sha, en_len) = manifest(&en);
    let (de_sha, de_len) = manifest(&de);
    s.write(
        "p.toml",
        &format!(
            r#"
[stages.xquad_r]
kind = "download"
files = [
  {{ url = "{en}", sha256 = "{en_sha}" }},
  {{ url = "{de}", sha256 = "{de_sha}", name = "german.json" }},
]
"#
        ),
    );
    let mirror = mirror();
    let ran = s.ok(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        mirror.to_str().unwrap(),
    ]);
    assert_eq!(ran.counts(), (1, 0));
    let dir = files_dir(&s, "xquad_r");
    assert_eq!(
        std::fs::metadata(dir.join("en.json")).unwrap().len(),
        en_len
    );
    assert_eq!(
        std::fs::metadata(dir.join("german.json")).unwrap().len(),
        de_len
    );
    // The mirror list is not part of the key: a run without it is cached.
    assert_eq!(s.ok(&["run", "p.toml", "--offline"]).counts(), (0, 1));
}

#[test]
fn checksum_mismatch_keeps_nothing() {
    let s = Scratch::new();
    let url = format!("{LAREQA}/en.json");
    let wrong = "0".repeat(64);
    s.write(
        "p.toml",
        &format!("[stages.d]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{wrong}\"\n"),
    );
    let mirror = mirror();
    let ran = s.xlpipe(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        mirror.to_str().unwrap(),
    ]);
    assert_eq!(ran.code, 1, "{ran}");
    let (actual, _) = manifest(&url);
    assert!(
        ran.stderr
            .contains(&format!("(checksum mismatch: {actual})")),
        "{ran}"
    );
    assert_eq!(s.records(), 0);
    assert_eq!(common::count_files(&s.cache().join("objects")), 0);
}

#[test]
fn missing_everywhere_names_the_url_and_mirrors() {
    let s = Scratch::new();
    let url = "https://example.org/not/mirrored.json";
    s.write(
        "p.toml",
        &format!(
            "[stages.d]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{}\"\n",
            "1".repeat(64)
        ),
    );
    let mirror = mirror();
    let ran = s.xlpipe(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        mirror.to_str().unwrap(),
    ]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr
            .contains(&format!("{url} is in no mirror and the run is offline")),
        "{ran}"
    );
    assert!(
        ran.stderr
            .contains("example.org/not/mirrored.json (not there)"),
        "{ran}"
    );
    // Online but unreachable: one clear error, too.
    let url = "http://127.0.0.1:9/refused.json";
    s.write(
        "p.toml",
        &format!(
            "[stages.d]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{}\"\n",
            "1".repeat(64)
        ),
    );
    let ran = s.xlpipe(&["run", "p.toml"]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr
            .contains(&format!("cannot fetch {url}; no mirrors configured")),
        "{ran}"
    );
}

/// A server that sends the first half of `body` and drops the connection,
/// then serves the rest to a `Range` request. Returns the URL and the
/// requests it saw.
fn flaky_server(body: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/data/file.bin", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(2).enumerate() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range_start = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = v.trim().trim_end_matches('-').parse().unwrap();
                }
                log.lock().unwrap().push(line.trim().to_string());
                if line.trim().is_empty() {
                    break;
                }
            }
            if n == 0 {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(&body[..body.len() / 2]).unwrap();
            } else {
                let rest = &body[range_start..];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {range_start}-{}/{}\r\n\r\n",
                    rest.len(),
                    body.len() - 1,
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(rest).unwrap();
            }
            stream.flush().unwrap();
            // Close: the first response ends short of its Content-Length.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    });
    (url, seen)
}

#[test]
fn resumes_after_a_dropped_connection() {
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = {
        use std::process::Command;
        let s = Scratch::new();
        let path = s.path("b");
        std::fs::write(&path, &body).unwrap();
        let out = Command::new("sha256sum").arg(&path).output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    let (url, seen) = flaky_server(body.clone());
    let s = Scratch::new();
    s.write(
        "p.toml",
        &format!("[stages.d]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\n"),
    );
    let ran = s.ok(&["run", "p.toml"]);
    assert!(ran.stderr.contains("retrying"), "{ran}");
    let got = std::fs::read(files_dir(&s, "d").join("file.bin")).unwrap();
    assert_eq!(got, body);
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|l| l.eq_ignore_ascii_case(&format!("range: bytes={}-", body.len() / 2))),
        "{seen:?}"
    );
}
