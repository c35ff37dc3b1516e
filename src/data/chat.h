#pragma once
// Chat prompts for the instruction-tuned models of each family, as their tokenizer_config.json
// chat templates render them (the formats are recognised, not interpreted as Jinja):
//   chatml   Qwen2:
//   <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
//   llama3   Llama 3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>...
//   llama2   Llama 2:    <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST]
//   chatglm3 ChatGLM3:   [gMASK]sop<|user|> + encode("\n") + encode(content) ... <|assistant|>
//   glm4     GLM-4:      [gMASK]<sop><|user|>\n...<|assistant|>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace mxn {

struct ChatMessage {
  std::string role;  // system, user or assistant
  std::string content;
};

// OpenAI-style messages [{"role": ..., "content": ...}, ...]: content a string or a list of text
// parts (an assistant's may be null), "developer" read as "system". An Error names `where`, the
// message and what is wrong.
std::vector<ChatMessage> chat_messages(const nlohmann::json& list, const std::string& where);
// The messages of a row {"messages": [...]} (a JSON line of a fine-tuning set).
std::vector<ChatMessage> chat_messages_from_json(const std::string& row_json,
                                                 const std::string& where);

enum class ChatFormat { chatml, llama3, llama2, chatglm3, glm4 };

// The format of a model folder: from its tokenizer_config.json chat_template when there is one,
// else from the special tokens its tokenizer has. An Error says why none applies (GPT-2, a base
// model's tokenizer without chat tokens).
ChatFormat chat_format(const std::string& model_dir, const Tokenizer& tok);
// The same from a chat template's text (a GGUF's tokenizer.chat_template; empty: from the
// tokenizer's special tokens); `what` names the model in the Error.
ChatFormat chat_format_of_template(const std::string& tmpl, const Tokenizer& tok,
                                   const std::string& what);

// The prompt's token ids, ending where the assistant's answer begins.
std::vector<int32_t> chat_prompt(ChatFormat f, const std::vector<ChatMessage>& messages,
                                 const Tokenizer& tok);

// A whole conversation for supervised fine-tuning: its ids as the chat template renders it (no
// generation prompt), and which of them carry the loss: each assistant message's content and the
// token that ends its turn (<|im_end|>, <|eot_id|>; GLM's formats end the conversation with their
// end-of-text token, as ChatGLM's fine-tuning scripts do). An Error names a message without a
// role or content, or an unknown role. The Llama 2 format is not supported here yet.
struct ChatTokens {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss;  // 1: an assistant token
};
ChatTokens chat_conversation(ChatFormat f, const std::vector<ChatMessage>& messages,
                             const Tokenizer& tok);

// The token ids that end an assistant turn in this format (generation stops at them).
std::vector<int32_t> chat_stop_ids(ChatFormat f, const Tokenizer& tok);

}  // namespace mxn
