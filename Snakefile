from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.preprocess_images.output,
        rules.make_folds.output,
        rules.choose_submission.output,
        rules.write_report.output,
