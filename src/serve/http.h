#pragma once
// What every route shares: OpenAI-shaped JSON errors, JSON text that never throws on bad UTF-8,
// bodies read through httplib's content readers with a bound, and the API key's comparison.
#include <httplib.h>

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>

namespace mxn {

// JSON text with invalid UTF-8 (a byte-level token's piece) replaced, never an exception.
std::string dump(const nlohmann::json& j);

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& type = "invalid_request_error", const std::string& code = "");

// Compares a client's secret with ours in time that does not depend on where they differ.
bool same_secret(const std::string& given, const std::string& ours);

bool is_json(std::string content_type);  // application/json, with parameters or not

// A request's body, decoded, at most `max` bytes however it is framed: HttpError 413 past that,
// 400 when its framing or compression is broken or it came too slowly.
std::string read_body(const httplib::ContentReader& reader, httplib::Response& res, size_t max);

int64_t now_s();  // unix seconds

}  // namespace mxn
