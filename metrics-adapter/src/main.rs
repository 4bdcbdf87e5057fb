fn main() {
    eprintln!("openclaw-metrics-adapter: not built yet");
    std::process::exit(2);
}
