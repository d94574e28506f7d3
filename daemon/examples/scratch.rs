fn main() {
    for _ in 0..3 {
        let t2 = std::time::Instant::now();
        let f = std::fs::File::open("/var/cache/edgefn/assets/efficientnet_lite0.tflite").unwrap();
        let l = classify::labels_from_model(f).unwrap();
        let t3 = std::time::Instant::now();
        println!("labels {:?} {} {}", t3 - t2, l.len(), l[285]);
    }
}
