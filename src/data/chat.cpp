#include "data/chat.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace mxn {

namespace {
void check_roles(const std::vector<ChatMessage>& messages);
}  // namespace

std::vector<ChatMessage> chat_messages(const nlohmann::json& list, const std::string& where) {
  if (!list.is_array() || list.empty())
    throw Error(where +
                ": no 'messages' list (expected {\"messages\": [{\"role\": \"user\", "
                "\"content\": \"...\"}, ...]})");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < list.size(); ++i) {
    const nlohmann::json& m = list[i];
    const std::string which = where + ": message " + std::to_string(i + 1);
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw Error(which + " needs a 'role' and a 'content' string");
    std::string role = m["role"].get<std::string>();
    if (role == "developer") role = "system";  // OpenAI's newer name for it
    const auto c = m.find("content");
    std::string content;
    if (c != m.end() && c->is_string()) {
      content = c->get<std::string>();
    } else if (c != m.end() && c->is_array()) {  // content parts: text only
      for (const nlohmann::json& part : *c) {
        if (!part.is_object() || part.value("type", nlohmann::json()) != "text" ||
            !part.contains("text") || !part["text"].is_string())
          throw Error(which +
                      ": only content parts {\"type\": \"text\", \"text\": ...} are supported");
        content += part["text"].get<std::string>();
      }
    } else if (role != "assistant" || (c != m.end() && !c->is_null())) {
      throw Error(which + " needs a 'role' and a 'content' string");
    }
    out.push_back({std::move(role), std::move(content)});
    try {
      check_roles({out.back()});
    } catch (const Error& e) {
      throw Error(which + ": " + e.what());
    }
  }
  return out;
}

std::vector<ChatMessage> chat_messages_from_json(const std::string& row_json,
                                                 const std::string& where) {
  const nlohmann::json j = nlohmann::json::parse(row_json, nullptr, false);
  if (j.is_discarded()) throw Error(where + ": not valid JSON");
  return chat_messages(j.is_object() ? j.value("messages", nlohmann::json()) : nlohmann::json(),
                       where);
}

ChatFormat chat_format(const std::string& model_dir, const Tokenizer& tok) {
  namespace fs = std::filesystem;
  const fs::path cfg = fs::path(model_dir) / "tokenizer_config.json";
  std::string tmpl;
  if (fs::is_regular_file(cfg)) {
    const nlohmann::json j =
        nlohmann::json::parse(read_file(cfg.string(), "tokenizer config"), nullptr, false);
    if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_string())
      tmpl = j["chat_template"].get<std::string>();
  }
  return chat_format_of_template(tmpl, tok, "model folder '" + model_dir + "'");
}

ChatFormat chat_format_of_template(const std::string& tmpl, const Tokenizer& tok,
                                   const std::string& what) {
  auto has = [&](const char* marker) {
    return tmpl.empty() ? tok.token_id(marker) >= 0 : tmpl.find(marker) != std::string::npos;
  };
  if (has("<|im_start|>")) return ChatFormat::chatml;
  if (has("<|start_header_id|>")) return ChatFormat::llama3;
  if (has("<sop>") && has("<|user|>")) return ChatFormat::glm4;
  if (has("sop") && has("<|user|>")) return ChatFormat::chatglm3;
  if (tmpl.empty() ? std::string(tok.kind()) == "sentencepiece" : has("[INST]"))
    return ChatFormat::llama2;
  throw Error(what +
              " has no chat format mxn knows (its tokenizer has none of the chat tokens of "
              "Qwen2, Llama 2/3, ChatGLM3 or GLM-4; a base model like GPT-2 has no chat format)");
}

namespace {

int32_t special(const Tokenizer& tok, const char* text) {
  const int32_t id = tok.token_id(text);
  if (id < 0)
    throw Error(std::string("the tokenizer has no '") + text + "' token for this chat format");
  return id;
}

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

void check_roles(const std::vector<ChatMessage>& messages) {
  for (const ChatMessage& m : messages)
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
      throw Error("chat role '" + m.role + "' is not system, user or assistant");
}

// A text format's rendering, as segments: the template's own text (its turn markers) and each
// message's content (`content`: text a user wrote, never read as special tokens). `prompt`: end
// where the assistant's answer begins; else end the conversation (GLM-4: end-of-text, as its
// fine-tuning scripts do). `assistant`: each assistant message's content and end-of-turn token.
struct Segment {
  std::string text;
  bool assistant = false, content = false;
};
using Segments = std::vector<Segment>;
Segments render(ChatFormat f, const std::vector<ChatMessage>& messages, bool prompt) {
  Segments segs;
  switch (f) {
    case ChatFormat::chatml:  // Qwen2's template adds its default system message
      if (messages.empty() || messages[0].role != "system")
        segs.push_back({"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"});
      for (const ChatMessage& m : messages) {
        const bool a = m.role == "assistant";
        segs.push_back({"<|im_start|>" + m.role + "\n"});
        segs.push_back({m.content, a, true});
        segs.push_back({"<|im_end|>", a});
        segs.push_back({"\n"});
      }
      if (prompt) segs.push_back({"<|im_start|>assistant\n"});
      break;
    case ChatFormat::llama3:
      segs.push_back({"<|begin_of_text|>"});
      for (const ChatMessage& m : messages) {
        const bool a = m.role == "assistant";
        segs.push_back({"<|start_header_id|>" + m.role + "<|end_header_id|>\n\n"});
        segs.push_back({trim(m.content), a, true});
        segs.push_back({"<|eot_id|>", a});
      }
      if (prompt) segs.push_back({"<|start_header_id|>assistant<|end_header_id|>\n\n"});
      break;
    case ChatFormat::glm4:
      segs.push_back({"[gMASK]<sop>"});
      for (const ChatMessage& m : messages) {
        const bool a = m.role == "assistant";
        segs.push_back({"<|" + m.role + "|>"});
        segs.push_back({"\n", a});
        segs.push_back({m.content, a, true});
      }
      segs.push_back(prompt ? Segment{"<|assistant|>"} : Segment{"<|endoftext|>", true});
      break;
    case ChatFormat::llama2: {
      if (!prompt)
        throw Error("supervised fine-tuning with the Llama 2 chat format is not supported yet");
      size_t i = 0;
      std::string system;
      if (!messages.empty() && messages[0].role == "system") system = messages[i++].content;
      for (bool first = true; i < messages.size(); ++i, first = false) {
        const ChatMessage& m = messages[i];
        if (m.role == "user") {
          const std::string c = first && !system.empty()
                                    ? "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + m.content
                                    : m.content;
          segs.push_back({"<s>[INST] "});
          segs.push_back({trim(c), false, true});
          segs.push_back({" [/INST]"});
        } else {
          segs.push_back({" ", true});
          segs.push_back({trim(m.content), true, true});
          segs.push_back({" </s>", true});
        }
      }
      break;
    }
    case ChatFormat::chatglm3:
      MXN_CHECK(false, "chatglm3 is rendered by token");
  }
  return segs;
}

// The special tokens a format's template writes (the only text of a prompt read as special).
std::vector<std::string> markers(ChatFormat f) {
  switch (f) {
    case ChatFormat::chatml:
      return {"<|im_start|>", "<|im_end|>"};
    case ChatFormat::llama3:
      return {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"};
    case ChatFormat::glm4:
      return {"[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"};
    case ChatFormat::llama2:
      return {"<s>", "</s>"};
    case ChatFormat::chatglm3:
      break;
  }
  return {};
}

// A prompt's ids: the template's markers as their tokens, the text between them (messages'
// content included) encoded with special tokens as plain text. For content without special
// tokens' text this equals encoding the rendered text whole, as transformers does; with it, a
// user's "<|im_start|>system" stays text and cannot open a turn of its own.
std::vector<int32_t> encode_prompt(const Segments& segs, ChatFormat f, const Tokenizer& tok) {
  const std::vector<std::string> marks = markers(f);
  std::vector<int32_t> out;
  std::string text;
  auto flush = [&] {
    const std::vector<int32_t> ids = tok.encode(text, Tokenizer::Specials::as_text);
    out.insert(out.end(), ids.begin(), ids.end());
    text.clear();
  };
  for (const Segment& s : segs) {
    if (s.content) {
      text += s.text;
      continue;
    }
    for (size_t i = 0; i < s.text.size();) {
      const auto m = std::find_if(marks.begin(), marks.end(), [&](const std::string& k) {
        return s.text.compare(i, k.size(), k) == 0 && tok.token_id(k) >= 0;
      });
      if (m == marks.end()) {
        text += s.text[i++];
        continue;
      }
      flush();
      out.push_back(tok.token_id(*m));
      i += m->size();
    }
  }
  flush();
  return out;
}

// ChatGLM3 encodes each part on its own, as its tokenizer does: [gMASK] sop, then per message
// <|role|> + encode("\n") + encode(content); a prompt ends with <|assistant|>, a conversation
// with </s>.
ChatTokens chatglm3_tokens(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                           bool prompt) {
  ChatTokens out;
  auto add = [&](const std::vector<int32_t>& ids, bool loss) {
    out.ids.insert(out.ids.end(), ids.begin(), ids.end());
    out.loss.insert(out.loss.end(), ids.size(), loss ? 1 : 0);
  };
  add({special(tok, "[gMASK]"), special(tok, "sop")}, false);
  for (const ChatMessage& m : messages) {
    add({special(tok, ("<|" + m.role + "|>").c_str())}, false);
    const bool a = m.role == "assistant";
    add(tok.encode("\n"), a);
    add(tok.encode(m.content, Tokenizer::Specials::as_text), a);
  }
  add({special(tok, prompt ? "<|assistant|>" : "</s>")}, !prompt);
  return out;
}

// Encodes the concatenated segments as one text (as transformers tokenises a rendered
// template) and marks the tokens that start inside an assistant segment: byte-level BPE and
// tiktoken pieces concatenate to the text exactly, so byte offsets place each token.
ChatTokens encode_segments(const Segments& segs, const Tokenizer& tok) {
  std::string text;
  std::vector<std::pair<size_t, size_t>> loss;
  for (const Segment& s : segs) {
    if (s.assistant) loss.push_back({text.size(), text.size() + s.text.size()});
    text += s.text;
  }
  ChatTokens out;
  out.ids = tok.encode(text);
  size_t at = 0;
  for (int32_t id : out.ids) {
    bool in = false;
    for (auto [a, b] : loss) in = in || (at >= a && at < b);
    out.loss.push_back(in ? 1 : 0);
    at += tok.piece(id).size();
  }
  if (at != text.size())
    throw Error(std::string("the ") + tok.kind() +
                " tokenizer's pieces do not spell the conversation back; this format's loss mask "
                "needs a byte-level tokenizer");
  return out;
}

}  // namespace

std::vector<int32_t> chat_prompt(ChatFormat f, const std::vector<ChatMessage>& messages,
                                 const Tokenizer& tok) {
  check_roles(messages);
  if (f == ChatFormat::chatglm3) return chatglm3_tokens(messages, tok, true).ids;
  return encode_prompt(render(f, messages, true), f, tok);
}

ChatTokens chat_conversation(ChatFormat f, const std::vector<ChatMessage>& messages,
                             const Tokenizer& tok) {
  if (messages.empty()) throw Error("a conversation has no messages");
  check_roles(messages);
  if (f == ChatFormat::chatglm3) return chatglm3_tokens(messages, tok, false);
  return encode_segments(render(f, messages, false), tok);
}

std::vector<int32_t> chat_stop_ids(ChatFormat f, const Tokenizer& tok) {
  std::vector<const char*> names;
  switch (f) {
    case ChatFormat::chatml:
      names = {"<|im_end|>", "<|endoftext|>"};
      break;
    case ChatFormat::llama3:
      names = {"<|eot_id|>", "<|end_of_text|>"};
      break;
    case ChatFormat::llama2:
      names = {"</s>"};
      break;
    case ChatFormat::chatglm3:
    case ChatFormat::glm4:
      names = {"<|user|>", "<|observation|>", "<|endoftext|>"};
      break;
  }
  std::vector<int32_t> ids;
  for (const char* n : names)
    if (tok.token_id(n) >= 0) ids.push_back(tok.token_id(n));
  return ids;
}

}  // namespace mxn
