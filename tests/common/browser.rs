//! A real headless Chromium for the console's tests: Debian's `chromium`
//! driven through `chromedriver` (WebDriver) with fantoccini. Each
//! [`Browser`] has its own driver process, profile and download directory.
#![allow(dead_code)]

use fantoccini::{Client, ClientBuilder, Locator};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Browser {
    pub client: Client,
    driver: Child,
    pub downloads: PathBuf,
    _profile: tempfile::TempDir,
    /// `https://host:port` of the console.
    pub base: String,
}

/// The chromedriver to run: `TOLLGATE_CHROMEDRIVER`, else Debian's.
fn driver_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TOLLGATE_CHROMEDRIVER") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Whether the browser tests can run here. Without Chromium they fail
/// when `TOLLGATE_REQUIRE_BROWSER=1` (CI, `scripts/test`), and are
/// skipped, loudly, otherwise.
pub fn available() -> bool {
    if driver_path().is_some() && Path::new("/usr/bin/chromium").exists() {
        return true;
    }
    if std::env::var("TOLLGATE_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!(
            "TOLLGATE_REQUIRE_BROWSER=1 but chromium/chromedriver are missing (apt-get install chromium chromium-driver)"
        );
    }
    eprintln!("SKIPPED: no chromium/chromedriver (scripts/test installs them)");
    false
}

impl Browser {
    /// Starts a driver and a headless Chromium that trusts the console's
    /// self-signed certificate (the tests pin nothing else in the browser).
    pub async fn start(console: &str) -> Browser {
        let port = crate::common::free_port();
        // Chromium runs on the real clock: under scripts/hostile-clock the
        // tests and the daemon see a faked one (libfaketime), which hangs
        // Chromium; the browser has no clock logic of ours to test.
        let driver = Command::new(driver_path().expect("chromedriver"))
            .env_remove("LD_PRELOAD")
            .env_remove("FAKETIME")
            .env_remove("FAKETIME_DONT_FAKE_MONOTONIC")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let downloads = profile.path().join("downloads");
        std::fs::create_dir_all(&downloads).unwrap();
        let caps = serde_json::json!({
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                    "safebrowsing.enabled": false,
                },
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let mut client = None;
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Browser {
            client: client.expect("chromedriver did not answer"),
            driver,
            downloads,
            _profile: profile,
            base: format!("https://{console}"),
        }
    }

    /// Loads `path` of the console.
    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        self.client
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The path of the page shown now.
    pub async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_string()
    }

    /// Clicks what `loc` finds and waits for the page it leads to.
    pub async fn click(&self, loc: Locator<'_>) {
        let old = self.client.find(Locator::Css("html")).await.unwrap();
        self.client.find(loc).await.unwrap().click().await.unwrap();
        self.wait_replaced(old).await;
    }

    /// Runs `script` (which submits a form or follows a link) and waits
    /// for the page it leads to.
    pub async fn run_and_wait(&self, script: &str) {
        let old = self.client.find(Locator::Css("html")).await.unwrap();
        self.client.execute(script, vec![]).await.unwrap();
        self.wait_replaced(old).await;
    }

    /// Waits until `old` (the previous page's root) is gone and the new
    /// page has loaded.
    async fn wait_replaced(&self, old: fantoccini::elements::Element) {
        for _ in 0..400 {
            if old.tag_name().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for _ in 0..400 {
            let ready = self
                .client
                .execute("return document.readyState", vec![])
                .await
                .ok();
            if ready == Some(serde_json::json!("complete")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the page did not load");
    }

    /// Types `text` into the field `css` finds, replacing what it held.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        if !text.is_empty() {
            e.send_keys(text).await.unwrap();
        }
    }

    /// Ticks (or unticks) the checkbox `css` finds, or picks a radio button.
    pub async fn tick(&self, css: &str, on: bool) {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        if e.is_selected().await.unwrap() != on {
            e.click().await.unwrap();
        }
    }

    /// The current value of the field `css` finds.
    pub async fn value(&self, css: &str) -> String {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        e.prop("value").await.unwrap().unwrap_or_default()
    }

    /// The text of what `css` finds, if the page has it.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let e = self.client.find(Locator::Css(css)).await.ok()?;
        e.text().await.ok()
    }

    /// Sizes the window so a long page fits one screenshot.
    pub async fn fit_page(&self) {
        let h = self
            .client
            .execute("return document.documentElement.scrollHeight", vec![])
            .await
            .ok()
            .and_then(|v| v.as_f64())
            .unwrap_or(1000.0);
        let _ = self
            .client
            .set_window_size(1280, (h as u32 + 140).min(6000))
            .await;
    }

    /// Fills in the login form and submits it.
    pub async fn login(&self, user: &str, password: &str) {
        self.goto("/login").await;
        let c = &self.client;
        c.find(Locator::Css("input[name=username]"))
            .await
            .unwrap()
            .send_keys(user)
            .await
            .unwrap();
        c.find(Locator::Css("input[name=password]"))
            .await
            .unwrap()
            .send_keys(password)
            .await
            .unwrap();
        self.click(Locator::Css("form.login button")).await;
    }

    /// Clicks "Log out".
    pub async fn logout(&self) {
        self.click(Locator::Css("form[action='/logout'] button"))
            .await;
        assert_eq!(self.path().await, "/login", "logged out");
    }

    /// Saves a screenshot of the page as `name`.png under
    /// target/console-screenshots (and docs/console/ when
    /// `TOLLGATE_DOCS_SCREENSHOTS=1`), checks that it is not blank, and
    /// returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        assert_not_blank(&png, name);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        if std::env::var("TOLLGATE_DOCS_SCREENSHOTS").as_deref() == Ok("1") {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(format!("{name}.png")), &png).unwrap();
        }
        path
    }

    /// Waits for a file named `name` to finish downloading; its bytes.
    pub async fn downloaded(&self, name: &str) -> Vec<u8> {
        let path = self.downloads.join(name);
        for _ in 0..200 {
            let partial = std::fs::read_dir(&self.downloads)
                .unwrap()
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "crdownload"));
            if path.exists() && !partial {
                return std::fs::read(&path).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} was not downloaded to {}", self.downloads.display());
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// A screenshot with fewer than 8 distinct colours, or with one colour
/// over 99.5% of it, shows nothing.
pub fn assert_not_blank(png_bytes: &[u8], name: &str) {
    let decoder = png::Decoder::new(png_bytes);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let mut counts = std::collections::HashMap::new();
    for p in buf[..info.buffer_size()].chunks(px) {
        *counts.entry(p[..3.min(px)].to_vec()).or_insert(0u64) += 1;
    }
    let total: u64 = counts.values().sum();
    let top = counts.values().max().copied().unwrap_or(0);
    assert!(
        counts.len() >= 8 && (top as f64) < total as f64 * 0.995,
        "screenshot {name} looks blank: {} colours, the commonest covers {:.2}%",
        counts.len(),
        top as f64 * 100.0 / total.max(1) as f64
    );
}
