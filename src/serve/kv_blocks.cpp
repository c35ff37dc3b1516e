#include "serve/kv_blocks.h"

#include <algorithm>

#include "core/error.h"

namespace mxn {

namespace {
uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

KvBlocks::KvBlocks(int64_t blocks, int64_t block) : block_(block) {
  if (blocks < 1 || block < 1) throw Error("the KV cache needs at least one block of one row");
  blocks_.resize(size_t(blocks));
  for (int64_t b = blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));  // 0 is taken first
}

uint64_t KvBlocks::key_of(uint64_t parent_key, const int32_t* tokens) const {
  uint64_t h = mix64(parent_key ^ 0x6d786e6b76ull);
  for (int64_t i = 0; i < block_; ++i) h = mix64(h ^ uint32_t(tokens[i]));
  return h;
}

std::vector<int32_t> KvBlocks::match(const std::vector<int32_t>& prompt, int64_t most, bool take,
                                     uint64_t salt) {
  std::vector<int32_t> out;
  uint64_t key = salt;
  int32_t parent = -1;
  for (int64_t i = 0; i < most && (i + 1) * block_ <= int64_t(prompt.size()); ++i) {
    const int32_t* t = prompt.data() + i * block_;
    key = key_of(key, t);
    auto it = by_key_.find(key);
    if (it == by_key_.end()) break;
    const Block& b = blocks_[size_t(it->second)];
    if (b.parent != parent || !std::equal(b.tokens.begin(), b.tokens.end(), t)) break;
    out.push_back(it->second);
    parent = it->second;
  }
  if (take)
    for (int32_t b : out) {
      Block& blk = blocks_[size_t(b)];
      if (blk.refs++ == 0) {
        --cached_;
        ++used_;
      }
    }
  return out;
}

void KvBlocks::unpublish(int32_t b) {
  Block& blk = blocks_[size_t(b)];
  if (!blk.published) return;
  by_key_.erase(blk.key);
  blk.published = false;
  blk.tokens.clear();
  blk.parent = -1;
}

int32_t KvBlocks::take() {
  int32_t b = -1;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    uint64_t oldest = UINT64_MAX;
    for (size_t i = 0; i < blocks_.size(); ++i)
      if (blocks_[i].refs == 0 && blocks_[i].published && blocks_[i].stamp < oldest) {
        oldest = blocks_[i].stamp;
        b = int32_t(i);
      }
    if (b < 0) return -1;
    unpublish(b);
    --cached_;
  }
  blocks_[size_t(b)].refs = 1;
  ++used_;
  return b;
}

void KvBlocks::hold(int32_t b) {
  MXN_CHECK(blocks_[size_t(b)].refs > 0, "holding an unreferenced KV block");
  ++blocks_[size_t(b)].refs;
}

void KvBlocks::publish(const std::vector<int32_t>& table, int64_t i,
                       const std::vector<int32_t>& prompt, uint64_t salt) {
  MXN_CHECK(i < int64_t(table.size()) && (i + 1) * block_ <= int64_t(prompt.size()),
            "publishing a block past the prompt");
  const int32_t b = table[size_t(i)];
  Block& blk = blocks_[size_t(b)];
  if (blk.published) return;  // taken from the cache already
  uint64_t key = salt;
  for (int64_t j = 0; j <= i; ++j) key = key_of(key, prompt.data() + j * block_);
  if (by_key_.count(key)) return;  // another request computed the same prefix at the same time
  blk.published = true;
  blk.key = key;
  blk.parent = i > 0 ? table[size_t(i - 1)] : -1;
  blk.tokens.assign(prompt.begin() + i * block_, prompt.begin() + (i + 1) * block_);
  by_key_[key] = b;
}

void KvBlocks::release(int32_t b) {
  Block& blk = blocks_[size_t(b)];
  MXN_CHECK(blk.refs > 0, "releasing an unreferenced KV block");
  if (--blk.refs > 0) return;
  --used_;
  blk.stamp = ++clock_;
  if (blk.published)
    ++cached_;
  else
    free_.push_back(b);
}

}  // namespace mxn
