//! A small W3C WebDriver client over reqwest, driving Debian's `chromium`
//! through `chromedriver` for the dashboard's browser test.
//!
//! The protocol needs a handful of JSON calls; doing them directly avoids a
//! browser-automation dependency tree in the test build. Install the browser
//! with `deploy/local/test-prereqs.sh` (CI runs it).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running chromedriver with one headless browser session; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    client: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Browser {
    /// Starts chromedriver and a headless chromium session.
    pub async fn start() -> Self {
        for tool in ["chromium", "chromedriver"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "`{tool}` is not installed: run `bash deploy/local/test-prereqs.sh` (apt-get install chromium chromium-driver)"
            );
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let client = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = client.get(format!("{root}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(body) = r.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }
        }}});
        let created: Value = client
            .post(format!("{root}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"));
        Self {
            base: format!("{root}/session/{session}"),
            driver,
            client,
        }
    }

    async fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut request = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response: Value = request.send().await.unwrap().json().await.unwrap();
        match response["value"]["error"].as_str() {
            Some(error) => Err(format!(
                "webdriver {method} {path}: {error}: {}",
                response["value"]["message"]
            )),
            None => Ok(response["value"].clone()),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// The text of `css`, or why it could not be read (absent, stale).
    async fn try_text(&self, css: &str) -> Result<String, String> {
        let found = self
            .try_call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        let id = found[ELEMENT].as_str().unwrap_or_default().to_owned();
        let text = self
            .try_call("GET", &format!("/element/{id}/text"), None)
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url}))).await;
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.call("GET", "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The first element matching `css` (panics when none).
    pub async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element for `{css}`: {found}"))
            .to_owned()
    }

    /// Clicks the element matching `css`, finding it again if the page's
    /// auto-refresh replaced it in between.
    pub async fn click(&self, css: &str) {
        let mut last = String::new();
        for _ in 0..10 {
            let id = self.find(css).await;
            match self
                .try_call("POST", &format!("/element/{id}/click"), Some(json!({})))
                .await
            {
                Ok(_) => return,
                Err(err) => last = err,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not click `{css}`: {last}");
    }

    /// Types `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The visible text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.call("GET", &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the text of `css` contains `wanted` (panics after `timeout`).
    pub async fn wait_for_text(&self, css: &str, wanted: &str, timeout: Duration) -> String {
        let what = format!("`{css}` showing `{wanted}`");
        poll(
            &what,
            timeout,
            |text| text.contains(wanted),
            || self.try_text(css),
        )
        .await
    }

    /// Waits until the page's URL ends with `suffix` (a click's navigation is
    /// not finished when the click returns), panicking after `timeout`.
    pub async fn wait_for_url(&self, suffix: &str, timeout: Duration) -> String {
        let what = format!("a URL ending with `{suffix}`");
        poll(
            &what,
            timeout,
            |url| url.ends_with(suffix),
            || async { Ok(self.url().await) },
        )
        .await
    }

    /// Saves a PNG screenshot to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let data = self.call("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    /// Ends the session (which closes chromium) with a plain blocking request,
    /// since drop cannot await, then stops chromedriver.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Some((host, path)) = self
            .base
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            && let Ok(mut stream) = std::net::TcpStream::connect(host)
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Reads `read` every 100 ms until `done` accepts it; panics naming `what`
/// and the last reading after `timeout`.
async fn poll<F, Fut>(what: &str, timeout: Duration, done: impl Fn(&str) -> bool, read: F) -> String
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        // An error (say, a stale element) is never the text waited for, even
        // when its message happens to contain it.
        let last = match read().await {
            Ok(text) if done(&text) => return text,
            Ok(text) => text,
            Err(err) => format!("(an error: {err})"),
        };
        assert!(Instant::now() < deadline, "never saw {what}; last: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
