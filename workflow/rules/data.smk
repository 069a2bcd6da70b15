rule generate_demo_data:
    output:
        dataset=directory(DEMO["out_dir"]),
    log:
        result("logs", "generate_demo_data.log"),
    benchmark:
        result("benchmarks", "generate_demo_data.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("generate_demo_data", 1)
    resources:
        **job_resources("generate_demo_data", mem_mb=1000, runtime=10),
    params:
        code=stage_fingerprint("demo-data"),
        flags=section_flags("demo", exclude=("enabled", "out_dir")),
    shell:
        "segflow demo-data {output.dataset:q} {params.flags} 2> {log:q}"


rule ingest_dataset:
    input:
        unpack(ingest_inputs),
    output:
        manifest=result("ingest", "manifest.parquet"),
        summary=result("ingest", "summary.json"),
    log:
        result("logs", "ingest_dataset.log"),
    benchmark:
        result("benchmarks", "ingest_dataset.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("ingest_dataset", MAX_THREADS)
    resources:
        **job_resources("ingest_dataset", mem_mb=4000, runtime=60),
    params:
        code=stage_fingerprint("ingest"),
        data=data_stamp,
        flags=section_flags("data"),
    shell:
        "segflow ingest {params.flags} --workers {threads}"
        " --out-manifest {output.manifest:q} --out-summary {output.summary:q} 2> {log:q}"


rule dedup:
    input:
        manifest=rules.ingest_dataset.output.manifest,
    output:
        dedup_items=result("dedup", "items.parquet"),
        summary=result("dedup", "summary.json"),
        report=result("dedup", "report.md"),
    log:
        result("logs", "dedup.log"),
    benchmark:
        result("benchmarks", "dedup.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("dedup", 1)
    resources:
        **job_resources("dedup", mem_mb=4000, runtime=60),
    params:
        code=stage_fingerprint("dedup"),
        flags=section_flags("dedup", exclude=NEAR_DUPLICATE_KEYS),
    shell:
        "segflow dedup --manifest {input.manifest:q} {params.flags}"
        " --out-items {output.dedup_items:q} --out-summary {output.summary:q}"
        " --out-report {output.report:q} 2> {log:q}"


rule preprocess_images:
    input:
        # budget.sizes: the chosen size (plan_resolution); nothing otherwise.
        unpack(resolution_inputs),
        manifest=rules.ingest_dataset.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        train_images=result("preprocess", "train_images.npy"),
        train_masks=result("preprocess", "train_masks.npy"),
        test_images=result("preprocess", "test_images.npy"),
        index=result("preprocess", "index.parquet"),
        stats=result("preprocess", "stats.json"),
    log:
        result("logs", "preprocess_images.log"),
    benchmark:
        result("benchmarks", "preprocess_images.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_images", MAX_THREADS)
    resources:
        **job_resources("preprocess_images", mem_mb=8000, runtime=120),
    params:
        code=stage_fingerprint("preprocess"),
        flags=section_flags("preprocess"),
        resolution=resolution_flags(),
        dicom=dicom_flags(),
        out_dir=lambda wildcards, output: os.path.dirname(output.stats),
    shell:
        "segflow preprocess --manifest {input.manifest:q} --dedup-items {input.dedup_items:q}"
        " {params.flags} {params.resolution} {params.dicom} --workers {threads} --out-dir {params.out_dir:q} 2> {log:q}"


rule make_folds:
    input:
        manifest=rules.ingest_dataset.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        folds=result("folds", "folds.csv"),
        summary=result("folds", "summary.json"),
    log:
        result("logs", "make_folds.log"),
    benchmark:
        result("benchmarks", "make_folds.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("make_folds", 1)
    resources:
        **job_resources("make_folds", mem_mb=2000, runtime=10),
    params:
        code=stage_fingerprint("folds"),
        flags=section_flags("folds"),
        near=near_duplicate_flags(),
    shell:
        "segflow folds --manifest {input.manifest:q} --dedup-items {input.dedup_items:q}"
        " {params.flags} {params.near} --out-folds {output.folds:q} --out-summary {output.summary:q} 2> {log:q}"
