#!/usr/bin/python3
"""mxn serve's chat page (GET /) in a real headless browser: Debian's chromium driven through
chromium-driver by selenium (PyPI, in the test venv). The page lists /v1/models; a message to the
chat model streams an answer equal to the API's greedy answer, with the chip that answered shown;
a base model is answered as a completion, equal to /v1/completions; Stop cancels a long answer
and the server frees its slot and KV blocks (read from /metrics). A screenshot is written to
ARTIFACTS/chat_page.png.
usage: serve_page_test.py MXN KJV_TXT GPT2_BPE_DIR ARTIFACTS
"""
import os, sys, tempfile, time, unittest, urllib.request

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import torch  # noqa: E402,F401  (may re-exec in the venv)
import openai  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

MXN, ARTIFACTS = sys.argv[1], sys.argv[4]
sys.argv = sys.argv[:4]
from serve_common import make_models, start_serve  # noqa: E402


class Page(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        base, chat, wide = make_models(cls.tmp.name)
        cls.proc, cls.url = start_serve("--model", f"chat={chat}", "--model", f"tiny={base}", "--model",
                                        f"wide={wide}", "--api-key", "sekrit", env={"MXN_FAULTS": "*:sleep=20:serve_step*:*:*"})
        cls.client = openai.OpenAI(base_url=cls.url + "/v1", api_key="sekrit", max_retries=0)
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=1100,800"):
            opts.add_argument(a)
        cls.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        cls.driver.get(cls.url + "/")
        key = cls.driver.find_element(By.ID, "key")
        key.send_keys("sekrit")
        cls.driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        WebDriverWait(cls.driver, 20).until(
            lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        cls.proc.terminate()
        cls.proc.wait(timeout=30)
        cls.tmp.cleanup()

    def metric(self, name, model):
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": "Bearer sekrit"})
        with urllib.request.urlopen(req, timeout=10) as r:  # /metrics needs the key too
            for line in r.read().decode().splitlines():
                if line.startswith(name + "{") and f'model="{model}"' in line:
                    return float(line.split()[-1])
        raise AssertionError(f"{name} not in /metrics")

    def ask(self, model, text, max_tokens, temperature="0"):
        d = self.driver
        Select(d.find_element(By.ID, "model")).select_by_value(model)
        for field, value in (("temperature", temperature), ("max_tokens", str(max_tokens))):
            e = d.find_element(By.ID, field)
            e.clear()
            e.send_keys(value)
        d.find_element(By.ID, "input").send_keys(text)
        d.find_element(By.ID, "send").click()
        return d.find_elements(By.CSS_SELECTOR, ".assistant")[-1]

    def answer_of(self, bubble):
        span, meta = bubble.find_elements(By.TAG_NAME, "span")
        return span.get_attribute("textContent"), meta.get_attribute("textContent")

    def test_1_chat_streams_the_greedy_answer(self):
        text = "In the beginning God created the heaven"
        want = self.client.chat.completions.create(model="chat", messages=[{"role": "user", "content": text}],
                                                   max_tokens=20, temperature=0)
        bubble = self.ask("chat", text, 20)
        WebDriverWait(self.driver, 60).until(lambda d: bubble.get_attribute("data-done") == "1")
        got, meta = self.answer_of(bubble)
        self.assertEqual(got, want.choices[0].message.content)
        self.assertEqual(want.system_fingerprint, "mxn:cpu:0")
        self.assertIn("answered by cpu:0", meta)
        self.assertIn(f"{want.usage.completion_tokens} tokens", meta)
        # A base model has no chat format: the page sends a completion instead.
        prompt = "And the earth was without form"
        want_base = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        bubble = self.ask("tiny", prompt, 12)
        WebDriverWait(self.driver, 60).until(lambda d: bubble.get_attribute("data-done") == "1")
        self.assertEqual(self.answer_of(bubble)[0], want_base.choices[0].text)
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "chat_page.png")
        self.driver.save_screenshot(shot)
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        print(f"chat page: the chat model's streamed answer ({want.usage.completion_tokens} tokens) = the API's "
              f"greedy one, answered by cpu:0; the base model's = /v1/completions; screenshot {shot}")

    def test_2_stop_cancels(self):
        cancelled = self.metric("mxn_requests_cancelled_total", "wide")
        bubble = self.ask("wide", "Sing a long psalm", 400, temperature="1")
        WebDriverWait(self.driver, 60).until(lambda d: len(self.answer_of(bubble)[0]) > 0)
        self.assertEqual(self.metric("mxn_batch_slots_used", "wide"), 1)
        self.driver.find_element(By.ID, "stop").click()
        WebDriverWait(self.driver, 30).until(lambda d: bubble.get_attribute("data-done") == "1")
        self.assertIn("stopped", self.answer_of(bubble)[1])
        t0 = time.time()
        while self.metric("mxn_kv_blocks_used", "wide") > 0 and time.time() - t0 < 10:
            time.sleep(0.01)
        self.assertEqual(self.metric("mxn_kv_blocks_used", "wide"), 0)
        self.assertEqual(self.metric("mxn_batch_slots_used", "wide"), 0)
        self.assertEqual(self.metric("mxn_requests_cancelled_total", "wide"), cancelled + 1)
        made = self.metric("mxn_generated_tokens_total", "wide")
        self.assertLess(made, 400)
        print(f"chat page: Stop after {made:.0f} of 400 tokens; the request cancelled, its slot and KV blocks free")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
