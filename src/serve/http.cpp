#include "serve/http.h"

#include <chrono>
#include <cstdint>

#include "serve/http_guard.h"
#include "serve/request.h"

namespace mxn {

using json = nlohmann::json;

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& type, const std::string& code) {
  res.status = status;
  json e = {{"message", message}, {"type", type}, {"param", nullptr}};
  e["code"] = code.empty() ? json(nullptr) : json(code);
  res.set_content(dump(json{{"error", e}}), "application/json");
}

bool same_secret(const std::string& given, const std::string& ours) {
  unsigned char diff = given.size() != ours.size();
  for (size_t i = 0; i < ours.size(); ++i)
    diff |= uint8_t(ours[i] ^ (i < given.size() ? given[i] : 0));
  return diff == 0;
}

bool is_json(std::string type) {
  for (char& c : type) c = char(std::tolower(uint8_t(c)));
  return type.rfind("application/json", 0) == 0 &&
         (type.size() == 16 || type[16] == ';' || type[16] == ' ');
}

std::string read_body(const httplib::ContentReader& reader, httplib::Response& res, size_t max) {
  std::string body;
  bool over = false;
  const bool ok = reader([&](const char* data, size_t n) {
    if (n > max - body.size()) return !(over = true);
    body.append(data, n);
    return true;
  });
  if (over || res.status == 413) {
    GuardedServer::close_after();  // the rest of it is left unread
    throw HttpError{413, "the request body is too large: over " + std::to_string(max) +
                             " bytes (after decompression)"};
  }
  if (!ok) {
    GuardedServer::close_after();
    throw HttpError{400,
                    "the request body could not be read (broken chunked or compressed "
                    "framing, or it did not arrive in time)"};
  }
  return body;
}

int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace mxn
