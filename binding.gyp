{
  "targets": [
    {
      "target_name": "lora_native",
      "sources": [
        "<!@(node -e \"for (const d of ['native/binding', 'native/cpu']) console.log(require('fs').readdirSync(d).filter(f=>f.endsWith('.cc')).map(f=>d+'/'+f).join(' '))\")"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-O3", "-fno-math-errno", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "libraries": ["-ldl", "-lpthread"]
    }
  ]
}
