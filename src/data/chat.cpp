#include "data/chat.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace mxn {

const char* chat_format_name(ChatFormat f) {
  switch (f) {
    case ChatFormat::chatml:
      return "chatml";
    case ChatFormat::llama3:
      return "llama3";
    case ChatFormat::llama2:
      return "llama2";
    case ChatFormat::chatglm3:
      return "chatglm3";
    case ChatFormat::glm4:
      return "glm4";
  }
  return "?";
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
  auto has = [&](const char* marker) {
    return tmpl.empty() ? tok.token_id(marker) >= 0 : tmpl.find(marker) != std::string::npos;
  };
  if (has("<|im_start|>")) return ChatFormat::chatml;
  if (has("<|start_header_id|>")) return ChatFormat::llama3;
  if (has("<sop>") && has("<|user|>")) return ChatFormat::glm4;
  if (has("sop") && has("<|user|>")) return ChatFormat::chatglm3;
  if (tmpl.empty() ? std::string(tok.kind()) == "sentencepiece" : has("[INST]"))
    return ChatFormat::llama2;
  throw Error("model folder '" + model_dir +
              "' has no chat format mxn knows (its tokenizer has none of the chat tokens of "
              "Qwen2, Llama 2/3, ChatGLM3 or GLM-4; a base model like GPT-2 has no chat format)");
}

namespace {

int32_t special(const Tokenizer& tok, const char* text) {
  const int32_t id = tok.token_id(text);
  if (id < 0)
    throw Error(std::string("the tokenizer has no '") + text + "' token for this chat format");
  return id;
}

void append(std::vector<int32_t>& out, const std::vector<int32_t>& more) {
  out.insert(out.end(), more.begin(), more.end());
}

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

}  // namespace

std::vector<int32_t> chat_prompt(ChatFormat f, const std::vector<ChatMessage>& messages,
                                 const Tokenizer& tok) {
  for (const ChatMessage& m : messages)
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
      throw Error("chat role '" + m.role + "' is not system, user or assistant");
  std::string text;
  std::vector<int32_t> ids;
  switch (f) {
    case ChatFormat::chatml:  // Qwen2's template adds its default system message
      if (messages.empty() || messages[0].role != "system")
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";
      for (const ChatMessage& m : messages)
        text += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      text += "<|im_start|>assistant\n";
      return tok.encode(text);
    case ChatFormat::llama3:
      text = "<|begin_of_text|>";
      for (const ChatMessage& m : messages)
        text += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + trim(m.content) +
                "<|eot_id|>";
      text += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return tok.encode(text);
    case ChatFormat::llama2: {
      size_t i = 0;
      std::string system;
      if (!messages.empty() && messages[0].role == "system") system = messages[i++].content;
      for (bool first = true; i < messages.size(); ++i, first = false) {
        const ChatMessage& m = messages[i];
        if (m.role == "user") {
          const std::string c = first && !system.empty()
                                    ? "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + m.content
                                    : m.content;
          text += "<s>[INST] " + trim(c) + " [/INST]";
        } else {
          text += " " + trim(m.content) + " </s>";
        }
      }
      return tok.encode(text);
    }
    case ChatFormat::glm4:
      text = "[gMASK]<sop>";
      for (const ChatMessage& m : messages) text += "<|" + m.role + "|>\n" + m.content;
      text += "<|assistant|>";
      return tok.encode(text);
    case ChatFormat::chatglm3:  // each part encoded on its own, as ChatGLM3's tokenizer does
      ids = {special(tok, "[gMASK]"), special(tok, "sop")};
      for (const ChatMessage& m : messages) {
        ids.push_back(special(tok, ("<|" + m.role + "|>").c_str()));
        append(ids, tok.encode("\n"));
        append(ids, tok.encode(m.content));
      }
      ids.push_back(special(tok, "<|assistant|>"));
      return ids;
  }
  return ids;
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
