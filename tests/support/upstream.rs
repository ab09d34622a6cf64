//! A plain-HTTP upstream on a loopback port, for the egress and secrets tests: it answers
//! every request with `hello from NAME PATH` and keeps the head of each.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// The upstream and the heads of the requests it answered.
pub struct Upstream {
    pub port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    /// Serves as `name` on a free loopback port, from threads of its own.
    pub fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&heads);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let kept = Arc::clone(&kept);
                std::thread::spawn(move || answer(client, name, &kept));
            }
        });
        Self { port, heads }
    }

    /// The head of every request answered so far (request line and headers).
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The request line of every request answered so far.
    pub fn request_lines(&self) -> Vec<String> {
        self.heads()
            .iter()
            .map(|head| head.lines().next().unwrap_or_default().to_string())
            .collect()
    }
}

fn answer(client: TcpStream, name: &str, kept: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = head.split(' ').nth(1).unwrap_or("?").to_string();
    kept.lock().unwrap().push(head);
    let body = format!("hello from {name} {path}\n");
    let _ = (&client).write_all(
        format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}
