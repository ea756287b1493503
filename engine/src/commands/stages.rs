//! `longrl stages [NAME]`: every stage with its ports and documented options, from the
//! registry (the single source of the recipe API).

use std::io::Write;

use anyhow::{Result, bail};
use longrl_stdlib::{PortSpec, Registry, StageFactory};

/// Prints every stage (or only `only`) to `out`.
pub fn print_stages(registry: &Registry, only: Option<&str>, out: &mut dyn Write) -> Result<()> {
    if let Some(name) = only
        && registry.get(name).is_none()
    {
        bail!("no stage named `{name}` (stages: {})", registry.names().collect::<Vec<_>>().join(", "));
    }
    for factory in registry.iter().filter(|f| only.is_none_or(|n| n == f.name())) {
        write_stage(factory.as_ref(), out)?;
    }
    Ok(())
}

fn write_stage(factory: &dyn StageFactory, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "{} - {}", factory.name(), factory.summary())?;
    let ports = |out: &mut dyn Write, label: &str, list: &[PortSpec]| -> std::io::Result<()> {
        for p in list {
            let need = if label == "input" && !p.required { " (optional)" } else { "" };
            writeln!(out, "    {label} {:<12} {:<8} {}{need}", p.name, p.kind.to_string(), p.doc)?;
        }
        Ok(())
    };
    ports(out, "input", factory.inputs())?;
    ports(out, "output", factory.outputs())?;
    if !factory.positional().is_empty() {
        writeln!(out, "    positional: {}", factory.positional().join(", "))?;
    }
    for option in factory.options() {
        let default = match (&option.default, option.required) {
            (Some(d), _) => format!(" = {d}"),
            (None, true) => " (required)".to_string(),
            (None, false) => String::new(),
        };
        writeln!(out, "    option {:<18} {}{default}", option.name, option.ty)?;
        if !option.doc.is_empty() {
            writeln!(out, "        {}", option.doc)?;
        }
    }
    writeln!(out)?;
    Ok(())
}
