#include "reaper.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace kevlarflow::comm {
namespace {

class Reaper {
 public:
  Reaper() { std::thread([this] { run(); }).detach(); }

  void push(std::shared_ptr<Transport> t) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(t));
      ++pending_;
    }
    cv_.notify_one();
  }

  size_t pending() {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_;
  }

 private:
  // An op running on another thread may still hold a transport (it returns
  // by its deadline); the reaper waits for it to let go, so that the last
  // owner, who runs the destructor, is always this thread.
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    std::deque<std::shared_ptr<Transport>> held;
    for (;;) {
      if (held.empty())
        cv_.wait(lock, [&] { return !queue_.empty(); });
      else
        cv_.wait_for(lock, std::chrono::milliseconds(20));
      while (!queue_.empty()) {
        held.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      lock.unlock();
      size_t destroyed = 0;
      for (auto it = held.begin(); it != held.end();) {
        if (it->use_count() == 1) {
          it->reset();  // may block until the backend's threads give up
          it = held.erase(it);
          ++destroyed;
        } else {
          ++it;
        }
      }
      lock.lock();
      pending_ -= destroyed;
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Transport>> queue_;
  size_t pending_ = 0;
};

// Never destroyed: the thread is detached and must not find its queue gone
// when the process exits while a transport is still being torn down.
Reaper& reaper() {
  static Reaper* r = new Reaper();
  return *r;
}

}  // namespace

void retire(std::shared_ptr<Transport> transport) {
  if (transport) reaper().push(std::move(transport));
}

size_t retired_pending() { return reaper().pending(); }

}  // namespace kevlarflow::comm
